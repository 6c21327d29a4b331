"""Quantized uploads (unbiased stochastic rounding) and the basis a node computes from its own weights."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedsb.adapters.sb_init import weight_bases
from fedsb.upload import dequantize_update, quantize_update, rounding_generator, stochastic_round, upload_bytes
from fedsb.wire import round_basis


def hoeffding_radius(step: float, trials: int, failure: float = 1e-9) -> float:
    """|mean error| bound that holds with probability 1 - failure for ``trials`` independent roundings
    whose errors lie in an interval of width ``step`` (Hoeffding); derived, not picked to pass."""
    return step * math.sqrt(math.log(2 / failure) / (2 * trials))


@pytest.mark.parametrize("dtype,qmax", [("int8", 127), ("int4", 7)])
def test_stochastic_rounding_is_unbiased(dtype, qmax):
    rng = rounding_generator(0)
    scale, trials = 0.25, 20_000
    x = np.array([0.3, -0.3, 0.07, -1.74, 1.0, qmax * scale, -qmax * scale]) * (1.0 if dtype == "int8" else 0.5)
    codes = np.stack([stochastic_round(x, scale, qmax, rng) for _ in range(trials)])
    assert codes.min() >= -qmax and codes.max() <= qmax
    mean = codes.mean(axis=0) * scale
    assert np.all(np.abs(mean - x) <= hoeffding_radius(scale, trials)), (mean, x)
    # the bound is tight enough to catch a biased rounding: round-to-nearest is off by 0.3 steps on 0.3
    nearest = np.rint(x / scale) * scale
    assert np.any(np.abs(nearest - x) > hoeffding_radius(scale, trials))


@pytest.mark.parametrize("dtype", ["float32", "int8", "int4"])
def test_quantized_upload_bytes_match_the_formula(dtype):
    segments = [1024, 1024, 387, 3]
    delta = np.random.default_rng(1).standard_normal(sum(segments)).astype(np.float32)
    arrays = quantize_update(delta, segments, dtype, rounding_generator(2))
    assert sum(a.nbytes for a in arrays.values()) == upload_bytes(segments, dtype)
    back = dequantize_update(arrays, segments)
    assert back.dtype == np.float32 and back.shape == delta.shape
    # every entry within one step of its segment's scale (exact for float32)
    step = np.repeat([np.abs(delta[a:b]).max() / {"float32": np.inf, "int8": 127, "int4": 7}[dtype]
                      for a, b in zip(np.cumsum([0] + segments[:-1]), np.cumsum(segments))], segments)
    assert np.all(np.abs(back - delta) <= step * (1 + 1e-6))


def test_upload_ratio_to_the_float32_floor():
    """The issue's goals per round at Fed-SB's shapes (r=32: one 1024-number R per layer, 12 layers, a head)."""
    segments = [32 * 32] * 12 + [384 * 3 + 3]
    floor = upload_bytes(segments, "float32")
    assert upload_bytes(segments, "int8") <= 0.27 * floor
    assert upload_bytes(segments, "int4") <= 0.14 * floor


def test_rounding_is_reproducible_under_a_seed_and_fresh_without():
    delta = np.linspace(-1, 1, 513, dtype=np.float32)
    a = quantize_update(delta, [513], "int8", rounding_generator(7))["update_i8"]
    b = quantize_update(delta, [513], "int8", rounding_generator(7))["update_i8"]
    c = quantize_update(delta, [513], "int8", rounding_generator(None))["update_i8"]
    d = quantize_update(delta, [513], "int8", rounding_generator(None))["update_i8"]
    assert np.array_equal(a, b)
    assert not np.array_equal(c, d)  # 513 coin flips agreeing by chance: probability ~2^-500


@pytest.mark.parametrize("corrupt", ["short", "dtype", "scale_count", "scale_nan", "scale_negative", "code_128",
                                     "int4_short", "missing"])
def test_corrupt_quantized_update_is_refused(corrupt):
    segments = [10, 6]
    good8 = quantize_update(np.ones(16, np.float32), segments, "int8", rounding_generator(0))
    good4 = quantize_update(np.ones(16, np.float32), segments, "int4", rounding_generator(0))
    bad = {
        "short": {**good8, "update_i8": good8["update_i8"][:-1]},
        "dtype": {**good8, "update_i8": good8["update_i8"].astype(np.int16)},
        "scale_count": {**good8, "update_scale": good8["update_scale"][:1]},
        "scale_nan": {**good8, "update_scale": np.array([np.nan, 1], np.float32)},
        "scale_negative": {**good8, "update_scale": np.array([-1, 1], np.float32)},
        "code_128": {**good8, "update_i8": np.full(16, -128, np.int8)},
        "int4_short": {**good4, "update_i4": good4["update_i4"][:-1]},
        "missing": {"update_scale": good8["update_scale"]},
    }[corrupt]
    dequantize_update(good8, segments), dequantize_update(good4, segments)  # the good ones pass
    with pytest.raises(ValueError):
        dequantize_update(bad, segments)


def _weight_basis_digest(dtype: str) -> str:
    torch.manual_seed(3)
    weights = {"q": torch.randn(48, 32), "ffn": torch.randn(64, 32)}
    h = hashlib.sha256()
    for name, b in weight_bases(weights, rank=8).items():
        h.update(name.encode())
        h.update(round_basis(b.B, dtype).numpy().tobytes())
        h.update(round_basis(b.A, dtype).numpy().tobytes())
    return h.hexdigest()


def test_weight_basis_is_identical_in_two_processes():
    code = "from tests.test_upload import _weight_basis_digest as d; print(d('int4'), d('float32'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.split() == [_weight_basis_digest("int4"), _weight_basis_digest("float32")]


@pytest.mark.parametrize("directions", ["principal", "minor"])
def test_weight_basis_spans_the_singular_directions(directions):
    torch.manual_seed(0)
    W = torch.randn(40, 24, dtype=torch.float64)
    b = weight_bases({"w": W}, rank=5, directions=directions)["w"]
    S = torch.linalg.svdvals(W)
    want = S[:5] if directions == "principal" else S[-5:]
    got = torch.diagonal(b.B.double().T @ W @ b.A.double().T)
    assert torch.allclose(got.abs(), want, rtol=1e-5)
    assert torch.allclose(b.B.T @ b.B, torch.eye(5), atol=1e-5) and torch.allclose(b.A @ b.A.T, torch.eye(5), atol=1e-5)
    assert torch.equal(b.R0, torch.zeros(5, 5))
    # the sign convention: a sign flip of the SVD's output gives the same basis
    flipped = weight_bases({"w": -W}, rank=5, directions=directions)["w"]
    assert torch.equal(flipped.B, b.B)
