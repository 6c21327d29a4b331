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

The server's round broadcast (download-dtype) goes through the same quantizer, on the global vector itself
rather than an update (``name="adapter"``), and a nested-rank node is sent its block of the codes with every
segment's scale (``codes_block``).
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


def quantize_update(delta: np.ndarray, segments: list[int], dtype: str, rng: np.random.Generator,
                    name: str = "update") -> dict[str, np.ndarray]:
    """``delta`` (float32, the segments' sizes adding up to its length) as message arrays named after ``name``
    (``update``: a client's upload; ``adapter``: the server's broadcast)."""
    delta = np.asarray(delta, dtype=np.float32)
    if sum(segments) != delta.size:
        raise ValueError(f"segments add up to {sum(segments)}, the update has {delta.size} numbers")
    if dtype == "float32":
        return {name: delta}
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
    return {f"{name}_i8" if dtype == "int8" else f"{name}_i4": flat if dtype == "int8" else _pack_nibbles(flat),
            f"{name}_scale": np.asarray(scales, dtype=np.float32)}


def codes_block(arrays: dict[str, np.ndarray], n: int, index: np.ndarray | None, name: str = "adapter"
                ) -> dict[str, np.ndarray]:
    """The entries ``index`` (sorted) of a quantized vector of ``n`` numbers, with every segment's scale: what a
    nested-rank node, whose segments are the same tensors' leading blocks, dequantizes to its part of the vector."""
    if index is None or f"{name}_scale" not in arrays:
        return arrays if index is None else {name: arrays[name][index]}
    if f"{name}_i8" in arrays:
        return {f"{name}_i8": arrays[f"{name}_i8"][index], f"{name}_scale": arrays[f"{name}_scale"]}
    return {f"{name}_i4": _pack_nibbles(_unpack_nibbles(arrays[f"{name}_i4"], n)[index]),
            f"{name}_scale": arrays[f"{name}_scale"]}


def decode_vector(arrays: dict[str, np.ndarray], segments: list[int], dtype: str, name: str = "adapter") -> np.ndarray:
    """A received vector of ``dtype`` (its arrays exactly those ``quantize_update`` names), dequantized;
    ``ValueError`` naming what is wrong otherwise."""
    expected = {name} if dtype == "float32" else {f"{name}_i{dtype[-1]}", f"{name}_scale"}
    if set(arrays) != expected:
        raise ValueError(f"got arrays {sorted(arrays)}, expected {sorted(expected)}")
    return dequantize_update(arrays, segments, name)


def dequantize_update(arrays: dict[str, np.ndarray], segments: list[int], name: str = "update") -> np.ndarray:
    """Inverse of ``quantize_update``: the float32 update the client's codes stand for. A reply whose arrays
    do not fit ``segments`` (length, dtype, count of scales, a non-finite or negative scale) raises
    ``ValueError``, which reply validation turns into a refused reply."""
    n = int(sum(segments))
    if name in arrays:
        out = np.asarray(arrays[name])
        if out.dtype != np.float32 or out.shape != (n,):
            raise ValueError(f"float32 {name}: got {out.dtype} {out.shape}, expected float32 ({n},)")
        return out
    scales = np.asarray(arrays.get(f"{name}_scale", np.zeros(0)))
    if scales.dtype != np.float32 or scales.shape != (len(segments),):
        raise ValueError(f"{name} scales: got {scales.dtype} {scales.shape}, expected float32 ({len(segments)},)")
    if not np.all(np.isfinite(scales)) or np.any(scales <= 0):
        raise ValueError(f"{name} scales must be finite and positive")
    if f"{name}_i8" in arrays:
        codes = np.asarray(arrays[f"{name}_i8"])
        if codes.dtype != np.int8 or codes.shape != (n,):
            raise ValueError(f"int8 {name}: got {codes.dtype} {codes.shape}, expected int8 ({n},)")
        if codes.min(initial=0) < -127:
            raise ValueError(f"int8 {name}: a code outside [-127, 127]")
    elif f"{name}_i4" in arrays:
        packed = np.asarray(arrays[f"{name}_i4"])
        if packed.dtype != np.uint8:
            raise ValueError(f"int4 {name}: got {packed.dtype}, expected uint8")
        codes = _unpack_nibbles(packed, n)
    else:
        raise ValueError(f"no {name} in the message ({name}, {name}_i8 or {name}_i4)")
    return (codes.astype(np.float32) * np.repeat(scales, segments)).astype(np.float32)
