"""Reply validation: every client reply is checked before it may count in an aggregate."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

REASONS = ("missing-key", "extra-key", "shape", "dtype", "non-finite", "fingerprint", "update-norm", "num-examples")


class InvalidReply(ValueError):
    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class ReplySpec:
    shapes: Mapping[str, tuple[int, ...]]
    dtype: Any = np.float32
    fingerprint: str | None = None
    max_update_norm: float = 0.0


def check_num_examples(num_examples: Any) -> int:
    # bool is an int subclass but never a count; integral floats (Flower metrics are floats or ints) pass.
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, float, np.integer, np.floating)):
        raise InvalidReply("num-examples", f"num-examples {num_examples!r} is not a number")
    if isinstance(num_examples, (float, np.floating)) and (not math.isfinite(num_examples) or not float(num_examples).is_integer()):
        raise InvalidReply("num-examples", f"num-examples {num_examples!r} is not an integer")
    if int(num_examples) <= 0:
        raise InvalidReply("num-examples", f"num-examples {num_examples!r} is not positive")
    return int(num_examples)


def check_reply(spec: ReplySpec, arrays: Mapping[str, np.ndarray], num_examples: Any, fingerprint: str | None,
                reference: Mapping[str, np.ndarray] | None = None) -> int:
    """Return num-examples as a positive int if the reply is valid, else raise InvalidReply."""
    missing = sorted(set(spec.shapes) - set(arrays))
    if missing:
        raise InvalidReply("missing-key", f"reply lacks {missing}")
    extra = sorted(set(arrays) - set(spec.shapes))
    if extra:
        raise InvalidReply("extra-key", f"reply has unexpected {extra}")
    for k, shape in spec.shapes.items():
        a = arrays[k]
        if tuple(a.shape) != tuple(shape):
            raise InvalidReply("shape", f"key {k!r} has shape {tuple(a.shape)}, expected {tuple(shape)}")
        if a.dtype != np.dtype(spec.dtype):
            raise InvalidReply("dtype", f"key {k!r} has dtype {a.dtype}, expected {np.dtype(spec.dtype)}")
        if not np.isfinite(a).all():
            raise InvalidReply("non-finite", f"key {k!r} holds NaN or Inf")
    if spec.fingerprint is not None and fingerprint != spec.fingerprint:
        raise InvalidReply("fingerprint", f"basis fingerprint {fingerprint!r}, expected {spec.fingerprint!r}")
    if spec.max_update_norm > 0 and reference is not None:
        sq = sum(float(np.sum((arrays[k].astype(np.float64) - reference[k].astype(np.float64)) ** 2)) for k in spec.shapes)
        if math.sqrt(sq) > spec.max_update_norm:
            raise InvalidReply("update-norm", f"update norm {math.sqrt(sq):.4g} exceeds max-update-norm {spec.max_update_norm}")
    return check_num_examples(num_examples)
