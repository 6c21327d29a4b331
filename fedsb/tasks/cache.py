"""On-disk cache of what a fresh process would otherwise recompute: tokenized tables and client partitions.

A deployment's SuperNode starts a new ClientApp process for every message, which then tokenizes the whole
dataset and rebuilds its partition before training a few steps. Results here are keyed by a hash of
everything they depend on (the dataset file's bytes, the tokenizer's files, the settings), so a changed
dataset, model or config is a different key; each file also stores its key, and a file that does not
load or does not carry its key is rebuilt, never trusted (``np.load`` checks the zip's CRCs).
``FEDSB_DATA_CACHE=0`` turns it off. Hand-written because no library caches a ragged tokenization by
content: ``datasets``' fingerprint cache needs the Arrow dataset the table never becomes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "merges.txt",
                   "vocab.json", "tokenizer.model")


def cache_dir() -> Path | None:
    """``$FEDSB_CACHE_DIR/data`` (default ``~/.cache/fedsb/data``), or None when ``FEDSB_DATA_CACHE=0``."""
    if os.environ.get("FEDSB_DATA_CACHE", "1") == "0":
        return None
    return Path(os.environ.get("FEDSB_CACHE_DIR", Path.home() / ".cache" / "fedsb")) / "data"


@lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (memoized per process by path, size and mtime)."""
    st = os.stat(path)
    return _digest(str(path), st.st_size, st.st_mtime_ns)


def tokenizer_digest(model_path: str) -> str:
    """One hash over the tokenizer files of a model folder: a changed tokenizer is a changed key."""
    d = Path(model_path)
    return hashlib.sha256("".join(f"{f}:{file_digest(d / f)};" for f in TOKENIZER_FILES if (d / f).is_file())
                          .encode()).hexdigest()


def cached_arrays(kind: str, key_parts: dict[str, Any], build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``build()``'s arrays, from ``<cache>/<kind>-<key>.npz`` when a valid file is there, else built and saved."""
    root = cache_dir()
    if root is None:
        return build()
    key = hashlib.sha256(json.dumps({"kind": kind, **key_parts}, sort_keys=True, default=str).encode()).hexdigest()[:40]
    path = root / f"{kind}-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                out = {k: z[k] for k in z.files}
            if str(out.pop("__key__", "")) == key:
                return out
            log.warning("data cache: %s carries another key; rebuilding it", path)
        except Exception as e:  # truncated, corrupt, not a zip: rebuild
            log.warning("data cache: %s is unreadable (%s); rebuilding it", path, e)
    out = build()
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, __key__=np.array(key), **out)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    except OSError as e:  # a read-only or full disk costs speed, not the run
        log.warning("data cache: could not write %s (%s)", path, e)
    return out


class Ragged:
    """Rows of different lengths as one flat array and offsets (what a tokenizer returns, cacheable)."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    @classmethod
    def from_lists(cls, rows: list[list[int]]) -> "Ragged":
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=offsets[1:])
        flat = np.fromiter((x for r in rows for x in r), dtype=np.int64, count=int(offsets[-1]))
        return cls(flat, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, j: int) -> np.ndarray:
        return self.flat[self.offsets[j]:self.offsets[j + 1]]


def ragged_to_arrays(enc: dict[str, Ragged]) -> dict[str, np.ndarray]:
    return {f"{k}.{part}": getattr(v, part) for k, v in enc.items() for part in ("flat", "offsets")}


def arrays_to_ragged(arrays: dict[str, np.ndarray]) -> dict[str, Ragged]:
    names = sorted({k.rsplit(".", 1)[0] for k in arrays if k.endswith((".flat", ".offsets"))})
    return {n: Ragged(arrays[f"{n}.flat"], arrays[f"{n}.offsets"]) for n in names}


__all__ = ["Ragged", "arrays_to_ragged", "cache_dir", "cached_arrays", "file_digest", "ragged_to_arrays",
           "tokenizer_digest"]
