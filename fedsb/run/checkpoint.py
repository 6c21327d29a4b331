"""Atomic, verifiable checkpoints: one safetensors file, the JSON state in its metadata, a sha256 over both.

File layout: a plain safetensors file whose ``__metadata__`` holds

* ``format``: ``"fedsb-checkpoint/2"``;
* ``state``: the caller's state as canonical JSON (``sort_keys``; tuples come back as lists);
* ``sha256``: a digest over the format tag, the state JSON and, per tensor in name order, its name, dtype,
  shape and raw bytes. Any change to a tensor's bytes, dtype or shape or to the state is detected.

Writes are atomic: the bytes go to a temporary file in the same directory, are flushed and fsynced, then
``os.replace`` puts them on the final name and the directory is fsynced. A crash (even SIGKILL) at any
moment leaves either the previous checkpoint or the new one, whole; never a mix. Temporary files left by
a killed writer (``<name>.<random>.tmp``) are removed by the next successful save of the same path, so
one path must have one writer at a time.

:func:`load_checkpoint` raises :class:`CheckpointError` for anything it cannot vouch for (truncated,
corrupted, garbage, not a fedsb checkpoint, unreadable) and :class:`CheckpointNotFound` (a
``CheckpointError`` that is also a ``FileNotFoundError``) when there is no file.

:func:`rng_state` / :func:`set_rng_state` capture and restore Python's ``random``, numpy's *global* legacy
generator (``np.random.*``) and torch's default CPU generator as JSON-serialisable lists; generators a
caller creates itself (``np.random.default_rng(seed)``, CUDA generators) are the caller's to save.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

log = logging.getLogger(__name__)

FORMAT = "fedsb-checkpoint/2"


class CheckpointError(ValueError):
    """The file is not a whole, untampered fedsb checkpoint (truncated, corrupt, garbage, unreadable)."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """There is no checkpoint file at the path."""


class CheckpointMismatch(ValueError):
    """The checkpoint was made by a run that differs from this one in an identity field."""

    def __init__(self, field: str, expected: Any, found: Any, present: bool = True):
        self.field, self.expected, self.found, self.present = field, expected, found, present
        got = f"{field}={found!r}" if present else f"no {field}"
        super().__init__(f"checkpoint mismatch in {field!r}: the checkpoint was made with {got} but this run has "
                         f"{field}={expected!r}; use the checkpoint's value or another output-dir")

    def __reduce__(self):
        return (type(self), (self.field, self.expected, self.found, self.present))


# -- state (JSON) -----------------------------------------------------------------------------------
def _check_json(x: Any, where: str = "state") -> None:
    """Refuse what JSON would not give back as it was given (non-str keys) or cannot encode at all."""
    if x is None or isinstance(x, (bool, int, str)):
        return
    if isinstance(x, float):
        return  # NaN/Inf included: Python's json writes and reads them back
    if isinstance(x, Mapping):
        for k, v in x.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has a non-string key {k!r} ({type(k).__name__}); JSON would turn it into "
                                f"a string, so the state would not come back as saved")
            _check_json(v, f"{where}[{k!r}]")
        return
    if isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            _check_json(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(x).__name__} ({x!r:.60}), not JSON-serialisable; convert it "
                    "(e.g. float(x), int(x), x.tolist()) before checkpointing")


def _state_json(state: Mapping[str, Any]) -> str:
    _check_json(state)
    return json.dumps(state, sort_keys=True, separators=(",", ":"))


# -- tensors ----------------------------------------------------------------------------------------
def _as_tensor(name: Any, v: torch.Tensor | np.ndarray) -> torch.Tensor:
    if not isinstance(name, str):
        raise TypeError(f"tensor names must be strings, got {name!r}")
    if isinstance(v, np.ndarray):
        # native byte order, C order, own memory (torch.from_numpy shares it otherwise)
        return torch.from_numpy(np.array(v, dtype=v.dtype.newbyteorder("="), order="C", copy=True))
    if isinstance(v, torch.Tensor):
        # clone: no two saved tensors share storage (safetensors refuses that) and the caller may go on mutating
        return v.detach().to("cpu").contiguous().clone()
    raise TypeError(f"tensor {name!r} is a {type(v).__name__}, expected a torch.Tensor or numpy.ndarray")


def _raw(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _digest(tensors: Mapping[str, torch.Tensor], state_json: str) -> str:
    h = hashlib.sha256()

    def put(b: bytes | np.ndarray) -> None:  # length-prefixed: no two different inputs hash the same stream
        h.update((b.nbytes if isinstance(b, np.ndarray) else len(b)).to_bytes(8, "little"))
        h.update(b)

    put(FORMAT.encode())
    put(state_json.encode())
    for k in sorted(tensors):
        t = tensors[k]
        put(json.dumps([k, str(t.dtype), list(t.shape)]).encode())
        put(_raw(t))
    return h.hexdigest()


# -- save / load ------------------------------------------------------------------------------------
def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # platforms that cannot open directories (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, tensors: Mapping[str, torch.Tensor | np.ndarray], state: Mapping[str, Any]) -> None:
    """Write ``tensors`` and the JSON-serialisable ``state`` to ``path`` atomically (see the module doc).

    Tensors of any dtype safetensors knows (float64/32/16, bfloat16, int64..int8, uint8, bool) round-trip
    bit for bit; numpy arrays come back as torch tensors. ``state`` must be JSON: str keys; dicts, lists,
    tuples (loaded as lists), str, int, float (NaN/Inf allowed), bool, None; anything else is a TypeError.
    """
    path = Path(path)
    ts = {k: _as_tensor(k, v) for k, v in tensors.items()}
    state_json = _state_json(state)
    blob = st_save(ts, metadata={"format": FORMAT, "state": state_json, "sha256": _digest(ts, state_json)})
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
    _fsync_dir(path.parent)
    for stale in path.parent.glob(path.name + ".*.tmp"):  # left by a writer killed mid-write
        try:
            stale.unlink()
            log.info("removed %s, left by an interrupted checkpoint write", stale)
        except OSError:
            pass
    log.debug("checkpoint %s written (%d bytes, %d tensors)", path, len(blob), len(ts))


def _fail(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a usable fedsb checkpoint: {why}; "
                           "delete it (or point output-dir elsewhere) to start afresh")


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, state)`` of a checkpoint written by :func:`save_checkpoint`, after verifying its sha256.

    Raises :class:`CheckpointNotFound` if there is no file, :class:`CheckpointError` for anything else wrong.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise CheckpointNotFound(f"no checkpoint at {path}") from e
    except OSError as e:
        raise _fail(path, f"it cannot be read ({type(e).__name__}: {e})") from e
    if len(raw) < 8:
        raise _fail(path, f"it is truncated or empty ({len(raw)} bytes)")
    header_len = int.from_bytes(raw[:8], "little")
    if header_len > len(raw) - 8:
        raise _fail(path, f"its header claims {header_len} bytes but only {len(raw) - 8} follow (truncated or not safetensors)")
    try:
        header = json.loads(raw[8 : 8 + header_len])
    except (ValueError, UnicodeDecodeError) as e:
        raise _fail(path, f"its header is not valid JSON ({e})") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("state"), str) or not isinstance(meta.get("sha256"), str):
        raise _fail(path, "it lacks fedsb checkpoint metadata (a safetensors file, but not a checkpoint)")
    fmt = meta.get("format")
    if fmt != FORMAT:
        raise _fail(path, f"its format {fmt!r} is not {FORMAT!r}")
    try:
        tensors = dict(st_load(raw))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 (a Rust panic surfaces as a BaseException)
        raise _fail(path, f"safetensors cannot read it ({type(e).__name__}: {e})") from e
    if _digest(tensors, meta["state"]) != meta["sha256"]:
        raise _fail(path, "its sha256 does not match its contents (corrupted or modified)")
    try:
        state = json.loads(meta["state"])
    except ValueError as e:  # cannot happen for a file whose digest matched, unless written by something else
        raise _fail(path, f"its state is not JSON ({e})") from e
    return tensors, state


# -- compatibility ----------------------------------------------------------------------------------
def _canonical(x: Any) -> Any:
    """The value as a JSON round trip gives it back (tuples -> lists), so a tuple matches a saved list."""
    try:
        return json.loads(json.dumps(x, sort_keys=True))
    except (TypeError, ValueError):
        return x


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def check_compatible(state: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Raise :class:`CheckpointMismatch` for the first field of ``expected`` (in its order) whose value differs
    from ``state``'s (a field absent from ``state`` differs). Values compare as JSON gives them back."""
    for k, v in expected.items():
        if k not in state:
            raise CheckpointMismatch(k, v, None, present=False)
        if not _same(_canonical(state[k]), _canonical(v)):
            raise CheckpointMismatch(k, v, state[k])


# -- random number generators -----------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python ``random``, numpy's global generator and torch's CPU generator, as JSON-serialisable lists."""
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [str(kind), keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(d: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured, all three generators or none (``ValueError`` if malformed)."""
    before = rng_state()
    try:
        py = d["python"]
        random.setstate((int(py[0]), tuple(int(x) for x in py[1]), None if py[2] is None else float(py[2])))
        n = d["numpy"]
        np.random.set_state((str(n[0]), np.array(n[1], dtype=np.uint32), int(n[2]), int(n[3]), float(n[4])))
        torch.set_rng_state(torch.tensor(d["torch"], dtype=torch.uint8))
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        set_rng_state(before)
        raise ValueError(f"not an rng state from fedsb.run.checkpoint.rng_state ({type(e).__name__}: {e})") from e
