"""Uploads below 4 bytes a number: a client's update quantized with unbiased stochastic rounding.

A client uploads ``delta = v_i - v`` (its trained vector less the one it was sent), cut into segments (one
per adapted layer's R or LoRA factor, and the head), each as integer codes with one float32 scale:

    s = max|delta_seg| / qmax,   code = floor(delta / s + u),   u ~ U[0, 1)

so ``E[code·s] = delta`` entry by entry (the rounding is unbiased) and ``|code| <= qmax``. The server
dequantizes and averages ``v + code·s``: its mean is the exact mean of the clients' *quantized* models, and
for Fed-SB still exact in W (``mean(B·R_i·A) = B·mean(R_i)·A`` holds for any R_i). The noise ``u`` comes
from a seeded generator for reproducible runs, or from the OS entropy pool under DP (a seeded rounding
noise would be post-processing with a key the server could know; fresh entropy keeps it a true
randomization, the same source Opacus draws its noise from in secure mode).

Bytes on the wire: int8 one byte a number, int4 half a byte (two codes per byte, as the int4 basis), plus
4 bytes a segment for its scale.
"""

from __future__ import annotations

import numpy as np

from fedsb.wire import _pack_nibbles, _unpack_nibbles

UPLOAD_DTYPES = ("float32", "int8", "int4")
_QMAX = {"int8": 127, "int4": 7}


def upload_bytes(segments: list[int], dtype: str) -> int:
    """What an upload of ``dtype`` weighs, codes plus scales (the formula the tests check the wire against)."""
    n = int(sum(segments))
    if dtype == "float32":
        return 4 * n
    if dtype == "int8":
        return n + 4 * len(segments)
    if dtype == "int4":
        return (n + 1) // 2 + 4 * len(segments)
    raise ValueError(f"unknown upload dtype {dtype!r}; one of {UPLOAD_DTYPES}")


def rounding_generator(seed: int | None) -> np.random.Generator:
    """Seeded noise for a reproducible run; ``None``: fresh OS entropy (what DP runs use)."""
    return np.random.default_rng(seed)


def stochastic_round(x: np.ndarray, scale: float, qmax: int, rng: np.random.Generator) -> np.ndarray:
    """Integer codes with ``E[code]·scale = x`` for ``|x| <= qmax·scale``."""
    y = np.asarray(x, dtype=np.float64) / scale
    return np.clip(np.floor(y + rng.random(y.shape)), -qmax, qmax).astype(np.int8)


def quantize_update(delta: np.ndarray, segments: list[int], dtype: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``delta`` (float32, the segments' sizes adding up to its length) as message arrays."""
    delta = np.asarray(delta, dtype=np.float32)
    if sum(segments) != delta.size:
        raise ValueError(f"segments add up to {sum(segments)}, the update has {delta.size} numbers")
    if dtype == "float32":
        return {"update": delta}
    if dtype not in _QMAX:
        raise ValueError(f"unknown upload dtype {dtype!r}; one of {UPLOAD_DTYPES}")
    qmax, codes, scales, start = _QMAX[dtype], [], [], 0
    for n in segments:
        seg = delta[start : start + n]
        peak = float(np.abs(seg).max(initial=0.0))
        scale = np.float32(peak / qmax) if peak > 0 else np.float32(1.0)
        # the float32 scale is what the server multiplies by: round with it, not with the float64 ratio
        codes.append(stochastic_round(seg, float(scale), qmax, rng))
        scales.append(scale)
        start += n
    flat = np.concatenate(codes) if codes else np.zeros(0, np.int8)
    return {"update_i8" if dtype == "int8" else "update_i4": flat if dtype == "int8" else _pack_nibbles(flat),
            "update_scale": np.asarray(scales, dtype=np.float32)}


def dequantize_update(arrays: dict[str, np.ndarray], segments: list[int]) -> np.ndarray:
    """Inverse of ``quantize_update``: the float32 update the client's codes stand for. A reply whose arrays
    do not fit ``segments`` (length, dtype, count of scales, a non-finite or negative scale) raises
    ``ValueError``, which reply validation turns into a refused reply."""
    n = int(sum(segments))
    if "update" in arrays:
        out = np.asarray(arrays["update"])
        if out.dtype != np.float32 or out.shape != (n,):
            raise ValueError(f"float32 update: got {out.dtype} {out.shape}, expected float32 ({n},)")
        return out
    scales = np.asarray(arrays.get("update_scale", np.zeros(0)))
    if scales.dtype != np.float32 or scales.shape != (len(segments),):
        raise ValueError(f"update scales: got {scales.dtype} {scales.shape}, expected float32 ({len(segments)},)")
    if not np.all(np.isfinite(scales)) or np.any(scales <= 0):
        raise ValueError("update scales must be finite and positive")
    if "update_i8" in arrays:
        codes = np.asarray(arrays["update_i8"])
        if codes.dtype != np.int8 or codes.shape != (n,):
            raise ValueError(f"int8 update: got {codes.dtype} {codes.shape}, expected int8 ({n},)")
        if codes.min(initial=0) < -127:
            raise ValueError("int8 update: a code outside [-127, 127]")
    elif "update_i4" in arrays:
        packed = np.asarray(arrays["update_i4"])
        if packed.dtype != np.uint8:
            raise ValueError(f"int4 update: got {packed.dtype}, expected uint8")
        codes = _unpack_nibbles(packed, n)
    else:
        raise ValueError("no update in the reply (update, update_i8 or update_i4)")
    return (codes.astype(np.float32) * np.repeat(scales, segments)).astype(np.float32)
