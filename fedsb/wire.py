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

BASIS_DTYPES = ("float32", "bfloat16", "int8", "int4")
_QMAX = {"int8": 127, "int4": 7}  # symmetric code range of the integer basis dtypes


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
def basis_tensors(layers: Mapping[str, nn.Module], k: int | None = None) -> dict[str, torch.Tensor]:
    """The B and A of every SB layer, in the order the basis vector packs them; with ``k``, only B's first
    k columns and A's first k rows (the basis of a node at nested rank k)."""
    out = {}
    for n, layer in layers.items():
        B, A = layer.sb_B, layer.sb_A
        out[n + ".B"], out[n + ".A"] = (B, A) if k is None or k == B.shape[1] else (B[:, :k].contiguous(), A[:k])
    return out


def _quant_vectors(m: np.ndarray, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric integer codes in [-qmax, qmax] (int8) and one scale per basis vector of a 2-D matrix: per
    row of a wide matrix (A, r×n), per column of a tall one (B, m×r), so r scales either way. Each scale is
    the power of two just above max |vector| / qmax: code·scale is then exact in float32, and quantizing a
    dequantized matrix again gives the same codes and scales (its peak code stays above qmax / 2), so the
    server can re-encode the basis it holds bit for bit (a plain max/qmax scale would round differently the
    second time)."""
    m = np.asarray(m, dtype=np.float32)
    if m.shape[0] > m.shape[1]:
        codes, scale = _quant_vectors(m.T, qmax)
        return np.ascontiguousarray(codes.T), scale
    peak = np.abs(m).max(axis=1).astype(np.float64)
    scale = np.where(peak > 0, np.exp2(np.ceil(np.log2(np.where(peak > 0, peak, 1.0) / qmax))), 1.0).astype(np.float32)
    codes = np.clip(np.rint(m / scale[:, None]), -qmax, qmax).astype(np.int8)
    return codes, scale


def _dequant(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    # the one place integer codes become float32 again: the server rounds its own basis through it too
    if codes.shape[0] > codes.shape[1]:
        return codes.astype(np.float32) * scale[None, :]
    return codes.astype(np.float32) * scale[:, None]


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """int4 codes in [-7, 7], two per byte (code + 8 in each half; an odd count ends with a zero half)."""
    u = (codes.reshape(-1).astype(np.int16) + 8).astype(np.uint8)
    if u.size % 2:
        u = np.append(u, np.uint8(0))
    return (u[0::2] << 4) | u[1::2]


def _unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.shape != ((n + 1) // 2,):
        raise ValueError(f"int4 basis: {packed.size} bytes for {n} codes, expected {(n + 1) // 2}")
    u = np.empty(packed.size * 2, np.uint8)
    u[0::2], u[1::2] = packed >> 4, packed & 0x0F
    codes = u[:n].astype(np.int16) - 8
    if codes.min(initial=0) < -7 or codes.max(initial=0) > 7:
        raise ValueError("int4 basis: a code outside [-7, 7]")
    return codes.astype(np.int8)


def round_basis(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """What a B or A matrix becomes after the trip through ``encode_basis``/``decode_basis``: the server
    uses the rounded matrices itself, so that every party holds (and fingerprints) the same bits."""
    if dtype == "bfloat16":
        return t.bfloat16().float()
    if dtype in _QMAX:
        return torch.from_numpy(_dequant(*_quant_vectors(t.detach().cpu().numpy(), _QMAX[dtype])))
    if dtype == "float32":
        return t
    raise ValueError(f"unknown basis dtype {dtype!r}; one of {BASIS_DTYPES}")


def encode_basis(tensors: Mapping[str, torch.Tensor], dtype: str) -> dict[str, np.ndarray]:
    """B and A of every layer (``basis_tensors``, already rounded) as message arrays: float32 as is,
    bfloat16 as its bits in a uint16 array (half the bytes), int8 as codes with a float32 scale per basis
    vector and the matrices' shapes (a quarter of the bytes, plus 4 B per vector), int4 the same with two
    codes per byte (an eighth)."""
    vec = flatten(tensors)
    if dtype == "float32":
        return {"basis": vec}
    if dtype == "bfloat16":
        return {"basis_bf16": torch.from_numpy(vec).bfloat16().view(torch.uint16).numpy()}
    if dtype in _QMAX:
        parts = [_quant_vectors(t.detach().cpu().numpy(), _QMAX[dtype]) for t in tensors.values()]
        codes = np.concatenate([c.reshape(-1) for c, _ in parts])
        return {"basis_i8" if dtype == "int8" else "basis_i4": codes if dtype == "int8" else _pack_nibbles(codes),
                "basis_scale": np.concatenate([sc for _, sc in parts]),
                "basis_rows": np.array([d for t in tensors.values() for d in t.shape], dtype=np.int32)}
    raise ValueError(f"unknown basis dtype {dtype!r}; one of {BASIS_DTYPES}")


def decode_basis(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Inverse of ``encode_basis``: always the flat float32 vector of the (rounded) B and A matrices."""
    if "basis_bf16" in arrays:
        bits = torch.from_numpy(np.asarray(arrays["basis_bf16"]).astype(np.uint16).view(np.int16))
        return bits.view(torch.bfloat16).float().numpy()
    if "basis_i8" in arrays or "basis_i4" in arrays:
        scales, dims = np.asarray(arrays["basis_scale"]), np.asarray(arrays["basis_rows"])
        if "basis_i8" in arrays:
            codes = np.asarray(arrays["basis_i8"])
        else:
            codes = _unpack_nibbles(arrays["basis_i4"], int(np.prod(dims.reshape(-1, 2), axis=1).sum()))
        out, c, r = [], 0, 0
        for rows, cols in dims.reshape(-1, 2):
            k = min(rows, cols)  # one scale per basis vector
            out.append(_dequant(codes[c : c + rows * cols].reshape(rows, cols), scales[r : r + k]).reshape(-1))
            c, r = c + rows * cols, r + k
        if c != codes.size or r != scales.size:
            raise ValueError(f"integer basis: {codes.size} codes / {scales.size} scales do not match the shapes")
        return np.concatenate(out) if out else np.zeros(0, np.float32)
    return np.asarray(arrays["basis"], dtype=np.float32)


# -- the 1-bit initialization upload -------------------------------------------------------------
def pack_signs(vec: np.ndarray) -> np.ndarray:
    """``vec > 0`` packed 8 entries per byte (numpy.packbits): a 32x smaller init upload. A zero counts
    as negative: the vote only needs a side per entry, and exact zeros in a gradient sum are rare."""
    return np.packbits(np.asarray(vec) > 0)


def unpack_signs(packed: np.ndarray, n: int) -> np.ndarray:
    """±1 per entry (int8) from ``pack_signs``'s bytes; the length must be exactly ceil(n / 8)."""
    if packed.shape != ((n + 7) // 8,):
        raise ValueError(f"packed signs have shape {packed.shape}, expected ({(n + 7) // 8},)")
    return np.unpackbits(packed, count=n).astype(np.int8) * 2 - 1


def layer_list_fingerprint(layers: Mapping[str, tuple[int, int]]) -> str:
    """Hash of the adapted layers and their shapes: an init reply computed over other layers is refused."""
    return hashlib.sha256(";".join(f"{n}:{m}x{k}" for n, (m, k) in layers.items()).encode()).hexdigest()[:32]


def basis_fingerprint(model_id: str, rank: int, bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    """sha256 over the model id, the target layers, the rank and the bytes of every B and A.

    ``model_id`` is the model's content id (``Task.model_id``: architecture and target-layer weights),
    never a path, so two installs of one model agree and two different models do not. A client whose
    basis or model differs in any bit computes a different fingerprint, and its R is refused.
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
MESSAGE_CONFIG_DEFAULTS = {"dp-delta": 0.0, "dp-history": []}

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
