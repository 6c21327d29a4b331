"""Reply validation: every client reply is checked before it may count in an aggregate.

A reply, already decoded from Flower by the caller, is ``arrays`` (name -> numpy array), the
``num_examples`` the client claims (any type: it comes off the wire) and the basis ``fingerprint`` the
client trained against. :func:`check_reply` either returns the example count as a positive ``int`` or
raises :class:`InvalidReply` whose ``reason`` is one of :data:`REASONS`. The checks run in this order and
the first failure is reported:

1. ``missing-key`` / ``extra-key`` — the key set must equal ``spec.shapes``'s;
2. per key (in ``spec.shapes`` order): ``dtype`` (the value must be a numpy array of exactly
   ``spec.dtype``; a list or a tensor is a dtype error too), ``shape``, ``non-finite`` (NaN or ±Inf);
3. ``fingerprint`` — when ``spec.fingerprint`` is set, the reply's must equal it;
4. ``update-norm`` — when ``spec.max_update_norm > 0``, ``‖reply − reference‖₂`` over all keys together
   (computed in float64) must be ``<= max_update_norm``;
5. ``num-examples`` — see :func:`check_num_examples`.

num-examples policy: a Python/numpy integer (``bool`` excluded) or an *integral* finite float (``3.0``;
Flower metrics travel as int or float) that is ``>= 1`` and, when ``spec.max_num_examples > 0``, at most
that bound. ``2.5``, NaN, ±Inf, 0, negatives, strings, ``None`` and booleans are refused.

The server records each rejection (node, reason, detail) in that round's ``metrics.jsonl`` record.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

log = logging.getLogger(__name__)

# "quantization": an int8/int4 upload whose codes or scales no client could have sent (a zero or negative
# scale, an int8 code of -128); raised where the server decodes such an upload, before check_reply
REASONS = ("missing-key", "extra-key", "shape", "dtype", "non-finite", "fingerprint", "update-norm", "num-examples",
           "quantization")


class InvalidReply(ValueError):
    """A reply that must not count. ``reason`` is one of :data:`REASONS`; ``detail`` says what was wrong."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}; expected one of {REASONS}")
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")

    def __reduce__(self):  # picklable (Ray / multiprocessing) despite the two-argument constructor
        return (type(self), (self.reason, self.detail))


@dataclass(frozen=True)
class ReplySpec:
    """What a valid reply looks like.

    shapes: expected key -> shape (the key set must match exactly).
    dtype: the exact dtype every array must have (no silent casts: a float64 reply is refused).
    fingerprint: the basis fingerprint replies must carry; ``None`` skips the check.
    max_update_norm: ``0`` for no bound, else the largest allowed L2 norm of ``reply − reference`` over
        all keys together; a ``reference`` must then be passed to :func:`check_reply`.
    max_num_examples: ``0`` for no bound, else the largest example count a client may claim (a client
        claiming 10¹² examples would otherwise dominate a weighted mean).
    """

    shapes: Mapping[str, tuple[int, ...]]
    dtype: Any = np.float32
    fingerprint: str | None = None
    max_update_norm: float = 0.0
    max_num_examples: int = 0

    def __post_init__(self):
        object.__setattr__(self, "shapes", {k: tuple(int(d) for d in s) for k, s in self.shapes.items()})
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if not (math.isfinite(self.max_update_norm) and self.max_update_norm >= 0):
            raise ValueError(f"max_update_norm must be a finite number >= 0 (0: no bound), got {self.max_update_norm!r}")
        if isinstance(self.max_num_examples, bool) or not isinstance(self.max_num_examples, (int, np.integer)) \
                or self.max_num_examples < 0:
            raise ValueError(f"max_num_examples must be an int >= 0 (0: no bound), got {self.max_num_examples!r}")


def _keys(ks) -> str:
    return "[" + ", ".join(sorted(repr(k) for k in ks)) + "]"  # repr: keys off the wire may be of any type


def check_num_examples(num_examples: Any, max_num_examples: int = 0) -> int:
    """``num_examples`` as a positive ``int``, else :class:`InvalidReply` ("num-examples").

    Accepted: ints and numpy integers (not ``bool``/``numpy.bool_``) and integral finite floats (``3.0``),
    ``>= 1`` and, when ``max_num_examples > 0``, ``<= max_num_examples``.
    """
    if isinstance(num_examples, (bool, np.bool_)) or not isinstance(num_examples, (int, float, np.integer, np.floating)):
        raise InvalidReply("num-examples", f"num-examples {num_examples!r} ({type(num_examples).__name__}) is not a number")
    if isinstance(num_examples, (float, np.floating)):
        if not math.isfinite(num_examples) or not float(num_examples).is_integer():
            raise InvalidReply("num-examples", f"num-examples {num_examples!r} is not an integer")
    n = int(num_examples)
    if n <= 0:
        raise InvalidReply("num-examples", f"num-examples {num_examples!r} is not positive")
    if max_num_examples and n > max_num_examples:
        raise InvalidReply("num-examples", f"num-examples {n} exceeds the bound {max_num_examples}")
    return n


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``arrays − reference`` over all keys of ``arrays`` together, accumulated in float64."""
    sq = 0.0
    for k, a in arrays.items():
        if k not in reference:
            raise ValueError(f"reference lacks key {k!r}")
        ref = np.asarray(reference[k])
        if ref.shape != a.shape:
            raise ValueError(f"reference key {k!r} has shape {ref.shape}, the reply {a.shape}")
        d = (a.astype(np.float64, copy=False) - ref.astype(np.float64, copy=False)).ravel()
        sq += float(np.dot(d, d))
    return math.sqrt(sq)


def check_reply(spec: ReplySpec, arrays: Mapping[str, np.ndarray], num_examples: Any, fingerprint: str | None,
                reference: Mapping[str, np.ndarray] | None = None) -> int:
    """Return ``num_examples`` as a positive ``int`` if the reply is valid, else raise :class:`InvalidReply`.

    ``reference`` (the global arrays the client started from) is needed only for ``max_update_norm``;
    leaving it out while a bound is set is a programming error (``ValueError``), never a silent pass.
    """
    if not isinstance(arrays, Mapping):
        raise InvalidReply("missing-key", f"reply arrays are a {type(arrays).__name__}, not a mapping")
    missing = [k for k in spec.shapes if k not in arrays]
    if missing:
        raise InvalidReply("missing-key", f"reply lacks {_keys(missing)} (expected {_keys(spec.shapes)})")
    extra = [k for k in arrays if k not in spec.shapes]
    if extra:
        raise InvalidReply("extra-key", f"reply has unexpected {_keys(extra)} (expected {_keys(spec.shapes)})")
    for k, shape in spec.shapes.items():
        a = arrays[k]
        if not isinstance(a, np.ndarray):
            raise InvalidReply("dtype", f"key {k!r} is a {type(a).__name__}, expected a numpy array of {spec.dtype}")
        if a.dtype != spec.dtype:
            raise InvalidReply("dtype", f"key {k!r} has dtype {a.dtype}, expected {spec.dtype}")
        if a.shape != shape:
            raise InvalidReply("shape", f"key {k!r} has shape {a.shape}, expected {shape}")
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            raise InvalidReply("non-finite", f"key {k!r} holds {bad} NaN/Inf value(s) of {a.size}")
    if spec.fingerprint is not None and fingerprint != spec.fingerprint:
        raise InvalidReply("fingerprint", f"basis fingerprint {fingerprint!r}, expected {spec.fingerprint!r}")
    if spec.max_update_norm > 0:
        if reference is None:
            raise ValueError("ReplySpec.max_update_norm is set but check_reply got no reference")
        norm = update_norm(arrays, reference)
        if not norm <= spec.max_update_norm:
            raise InvalidReply("update-norm", f"update norm {norm:.6g} exceeds max-update-norm {spec.max_update_norm:g}")
    return check_num_examples(num_examples, spec.max_num_examples)
