"""What travels on the wire: flat float32 vectors, the basis and its dtype codecs, the basis fingerprint.

Both apps use these and nothing else to turn tensors into message arrays and back, so the server and a
client cannot disagree on order, dtype or framing. Everything here is numpy/torch only (no Flower).
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np
import torch
from torch import nn

BASIS_DTYPES = ("float32", "bfloat16")


def flatten(tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Named tensors -> one float32 vector, in the mapping's order."""
    if not tensors:
        return np.zeros(0, dtype=np.float32)
    return torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors.values()]).numpy()


@torch.no_grad()
def unflatten_into(tensors: Mapping[str, torch.Tensor], vec: np.ndarray) -> None:
    """Copy a flat vector back into the named tensors (same order and sizes as ``flatten``)."""
    expected = sum(t.numel() for t in tensors.values())
    if vec.shape != (expected,):
        raise ValueError(f"flat vector has shape {vec.shape}, expected ({expected},)")
    src = torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float32))
    offset = 0
    for t in tensors.values():
        n = t.numel()
        t.copy_(src[offset : offset + n].view_as(t).to(t.dtype))
        offset += n


def split(shapes: Mapping[str, torch.Tensor], vec: np.ndarray) -> dict[str, torch.Tensor]:
    """Views of ``vec`` shaped like each named tensor (no copy), in order."""
    out, offset = {}, 0
    src = torch.from_numpy(np.asarray(vec, dtype=np.float32))
    for n, t in shapes.items():
        out[n] = src[offset : offset + t.numel()].view(t.shape)
        offset += t.numel()
    return out


# -- the one-time basis ------------------------------------------------------------------------
def basis_tensors(layers: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The B and A of every SB layer, in the order the basis vector packs them."""
    out = {}
    for n, layer in layers.items():
        out[n + ".B"], out[n + ".A"] = layer.sb_B, layer.sb_A
    return out


def encode_basis(vec: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """The basis vector as message arrays: float32 as is, bfloat16 as its bits in a uint16 array
    (half the bytes; what the clients decode is exactly ``round_basis(vec, "bfloat16")``)."""
    if dtype == "bfloat16":
        return {"basis_bf16": torch.from_numpy(np.ascontiguousarray(vec, np.float32)).bfloat16().view(torch.uint16).numpy()}
    if dtype == "float32":
        return {"basis": np.ascontiguousarray(vec, dtype=np.float32)}
    raise ValueError(f"unknown basis dtype {dtype!r}; one of {BASIS_DTYPES}")


def decode_basis(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Inverse of ``encode_basis``: always a float32 vector."""
    if "basis_bf16" in arrays:
        bits = torch.from_numpy(np.asarray(arrays["basis_bf16"]).astype(np.uint16).view(np.int16))
        return bits.view(torch.bfloat16).float().numpy()
    return np.asarray(arrays["basis"], dtype=np.float32)


def round_basis(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """What a tensor becomes after the trip through ``encode_basis``/``decode_basis``: the server uses
    the rounded B, A itself, so that every party holds (and fingerprints) the same bits."""
    return t.bfloat16().float() if dtype == "bfloat16" else t


def basis_fingerprint(model_id: str, rank: int, bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    """sha256 over the model id, the target layers, the rank and the bytes of every B and A.

    A client whose basis differs in any bit reports a different fingerprint, and its R is refused.
    """
    h = hashlib.sha256()
    h.update(f"{model_id}|{rank}|{','.join(bases)}".encode())
    for name, (B, A) in bases.items():
        h.update(name.encode())
        h.update(B.detach().contiguous().cpu().numpy().tobytes())
        h.update(A.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def layers_fingerprint(model_id: str, rank: int, layers: Mapping[str, nn.Module]) -> str:
    return basis_fingerprint(model_id, rank, {n: (l.sb_B, l.sb_A) for n, l in layers.items()})


# Every train/evaluate message's config carries these keys (their values when the feature is off), so a
# client never has to guess which exist: method- and privacy-specific values override them.
MESSAGE_CONFIG_DEFAULTS = {"flora-stacks": 0, "dp-delta": 0.0, "dp-history": []}

# Flower's legacy messages (SecAgg+ rounds) carry only scalars in config and metrics: a list travels as
# JSON text behind this prefix and is decoded on the other side.
_LEGACY_LIST = "json:"


def to_legacy_scalars(d: dict) -> dict:
    import json

    return {k: (_LEGACY_LIST + json.dumps(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items()
            if isinstance(v, (list, tuple, bool, int, float, str, bytes))}


def from_legacy_scalars(d) -> dict:
    import json

    return {k: (json.loads(v[len(_LEGACY_LIST):]) if isinstance(v, str) and v.startswith(_LEGACY_LIST) else v)
            for k, v in dict(d).items()}
