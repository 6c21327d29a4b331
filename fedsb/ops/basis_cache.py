"""On-disk cache of a node's basis, keyed by fingerprint: a restarted SuperNode need not receive it again.

The fingerprint is a hash of the basis bytes, so a cached file is re-verified by the client (it rebuilds
the fingerprint from what it loaded) before it is trusted.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEDSB_CACHE_DIR", Path.home() / ".cache" / "fedsb")) / "basis"


class BasisCache:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def _path(self, fingerprint: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{8,64}", fingerprint or ""):
            raise ValueError(f"not a basis fingerprint: {fingerprint!r}")
        return self.root / f"{fingerprint}.safetensors"

    def put(self, fingerprint: str, vec: np.ndarray) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
            os.close(fd)
            save_file({"basis": torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float32))}, tmp)
            os.replace(tmp, self._path(fingerprint))
        except OSError as e:  # a cache is an optimisation: never fail a round over it
            log.warning("could not cache basis %s: %s", fingerprint, e)

    def get(self, fingerprint: str) -> np.ndarray | None:
        path = self._path(fingerprint)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["basis"].numpy()
        except Exception as e:  # noqa: BLE001 - a corrupt cache entry is just a miss
            log.warning("ignoring unreadable basis cache %s: %s", path, e)
            return None
