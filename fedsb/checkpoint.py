"""Atomic, verifiable checkpoints: one safetensors file, the JSON state in its metadata, a sha256 over both."""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


class CheckpointError(ValueError):
    pass


class CheckpointMismatch(ValueError):
    def __init__(self, field: str, expected: Any, found: Any):
        self.field, self.expected, self.found = field, expected, found
        super().__init__(f"checkpoint was made with {field}={found!r} but this run has {field}={expected!r}; "
                         "use the checkpoint's value or another output-dir")


def _digest(tensors: Mapping[str, torch.Tensor], state_json: str) -> str:
    h = hashlib.sha256(state_json.encode())
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(str(tensors[k].dtype).encode())
        h.update(tensors[k].contiguous().view(torch.uint8).numpy().tobytes() if tensors[k].numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: str | Path, tensors: Mapping[str, torch.Tensor | np.ndarray], state: Mapping[str, Any]) -> None:
    path = Path(path)
    ts = {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.detach().cpu().contiguous())
          for k, v in tensors.items()}
    state_json = json.dumps(state, sort_keys=True)
    blob = st_save(ts, metadata={"state": state_json, "sha256": _digest(ts, state_json)})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # the previous checkpoint stays whole until this instant
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    try:
        raw = path.read_bytes()
        header_len = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8 : 8 + header_len]).get("__metadata__", {})
        tensors = dict(st_load(raw))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); "
                              "delete it or point output-dir elsewhere") from e
    if "state" not in meta or "sha256" not in meta:
        raise CheckpointError(f"{path} lacks fedsb checkpoint metadata")
    if _digest(tensors, meta["state"]) != meta["sha256"]:
        raise CheckpointError(f"{path} is corrupt: its sha256 does not match its contents")
    return tensors, json.loads(meta["state"])


def check_compatible(state: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    for k, v in expected.items():
        if state.get(k) != v:
            raise CheckpointMismatch(k, v, state.get(k))


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(d: Mapping[str, Any]) -> None:
    py = d["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = d["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(d["torch"], dtype=torch.uint8))
