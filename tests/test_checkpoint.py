"""Checkpoints: bit-exact round trips (tensors of every dtype, JSON state, rng states), every corruption
refused, identity mismatches named, and a crash (exception or SIGKILL) mid-save never loses the old one."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from fedsb.run import checkpoint as ckpt
from fedsb.run.checkpoint import (CheckpointError, CheckpointMismatch, CheckpointNotFound, check_compatible, load_checkpoint,
                              rng_state, save_checkpoint, set_rng_state)

ROOT = Path(__file__).resolve().parents[1]


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert _bits(a) == _bits(b)  # bit for bit: NaN payloads and -0.0 included


def _small(path: Path, **state) -> None:
    save_checkpoint(path, {"global": torch.arange(6, dtype=torch.float32), "count": torch.tensor([3], dtype=torch.int64)},
                    {"round": 1, "config": {"rank": 4, "method": "fed-sb"}, **state})


# ---------------------------------------------------------------------------------------------------
def test_round_trip_is_bit_exact_for_every_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    f64 = torch.randn(5, 3, dtype=torch.float64, generator=g)
    f64[0, 0], f64[0, 1], f64[0, 2] = float("nan"), -0.0, float("inf")
    tensors = {
        "f64": f64,
        "f32": torch.randn(7, generator=g),
        "f16": torch.randn(4, generator=g).half(),
        "bf16": torch.randn(4, generator=g).bfloat16(),
        "i64": torch.tensor([-(2**63), 2**63 - 1, 0], dtype=torch.int64),
        "i32": torch.tensor([-5, 7], dtype=torch.int32),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.get_rng_state(),  # the torch rng state is a uint8 tensor
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),  # 0-dim
        "empty": torch.zeros(0, 3),
        "transposed": torch.arange(6.0).reshape(2, 3).t(),  # not contiguous
        "grad": torch.ones(2, requires_grad=True),
        "np_f32": np.arange(5, dtype=np.float32),
        "np_f64_bigendian": np.arange(3, dtype=">f8") / 3,
        "np_u8": np.array([0, 255], np.uint8),
    }
    base = torch.arange(10.0)
    tensors["view_a"], tensors["view_b"] = base[:5], base[5:]  # share storage: safetensors alone refuses this
    state = {
        "round": 3, "config": {"rank": 4, "target-modules": ["query", "value"], "lr": 0.1},
        "metrics": [{"loss": 0.1 + 0.2, "accuracy": 1 / 3, "eps": 1e-300}, {"loss": float("nan")}],
        "big": 2**70, "neg": -1, "flag": True, "none": None, "text": "héllo ✓", "tuple": (1, 2),
        "rng": rng_state(),
    }
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, tensors, state)
    back, st_back = load_checkpoint(path)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        expected = torch.from_numpy(v.astype(v.dtype.newbyteorder("="))) if isinstance(v, np.ndarray) else v.detach()
        _assert_same(back[k], expected)
    assert json.dumps(st_back, sort_keys=True) == json.dumps({**state, "tuple": [1, 2]}, sort_keys=True)
    assert st_back["metrics"][0]["loss"] == 0.1 + 0.2 and math.isnan(st_back["metrics"][1]["loss"])
    assert st_back["big"] == 2**70 and st_back["tuple"] == [1, 2]
    # saving copied the tensors: later changes by the caller do not reach the file
    tensors["f32"].add_(1)
    _assert_same(load_checkpoint(path)[0]["f32"], back["f32"])


def test_rng_state_restores_every_generator_exactly(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # leave cached gaussians in both states
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"x": torch.zeros(1)}, {"rng": rng_state()})
    json.dumps(rng_state())  # JSON-serialisable

    def draws():
        return (random.random(), random.gauss(0, 1), random.getrandbits(64), np.random.standard_normal(3).tolist(),
                np.random.randint(0, 2**31, 4).tolist(), torch.rand(3).tolist(), torch.randint(0, 2**31, (4,)).tolist(),
                torch.randn(2).tolist())

    first = draws()
    draws(), draws()  # move every generator on
    set_rng_state(load_checkpoint(path)[1]["rng"])
    assert draws() == first
    # a malformed state is refused and leaves the generators untouched
    before = rng_state()
    broken = json.loads(json.dumps(before))
    broken["torch"] = broken["torch"][:10]
    with pytest.raises(ValueError, match="rng state"):
        set_rng_state(broken)
    assert rng_state() == before
    with pytest.raises(ValueError):
        set_rng_state({"python": before["python"]})
    assert rng_state() == before


def test_state_that_json_would_change_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    for bad, where in [({"partition_of": {1: 2}}, "partition_of"), ({"x": np.float32(1)}, "x"),
                       ({"m": [{"a": torch.zeros(1)}]}, "m"), ({"s": {1, 2}}, "s")]:
        with pytest.raises(TypeError, match=where):
            save_checkpoint(path, {"x": torch.zeros(1)}, bad)
    with pytest.raises(TypeError):
        save_checkpoint(path, {1: torch.zeros(1)}, {})
    with pytest.raises(TypeError):
        save_checkpoint(path, {"x": [1.0]}, {})
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing written, no temporary left


# ---------------------------------------------------------------------------------------------------
# corruption
def test_every_single_byte_flip_and_every_truncation_is_detected(tmp_path):
    path = tmp_path / "c.safetensors"
    _small(path)
    raw = path.read_bytes()
    assert len(raw) < 2000
    for i in range(len(raw)):
        flipped = bytearray(raw)
        flipped[i] ^= 0xFF
        path.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
    for n in range(len(raw)):
        path.write_bytes(raw[:n])
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
    path.write_bytes(raw + b"\0")  # trailing bytes
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    path.write_bytes(raw)
    load_checkpoint(path)


def test_flipped_tensor_byte_is_reported_as_a_digest_mismatch(tmp_path):
    path = tmp_path / "c.safetensors"
    _small(path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # inside the tensor data: still a valid safetensors file
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256 does not match") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)
    assert path.read_bytes() == bytes(raw)  # refused, never overwritten


def test_tampered_state_with_the_old_digest_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    _small(path)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["state"] = meta["state"].replace('"round":1', '"round":2')
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)
    # a reshaped tensor with the same bytes is caught too (the digest covers shapes)
    _small(path)
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["global"] = tensors["global"].reshape(2, 3)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


def test_non_checkpoints_are_refused_clearly(tmp_path):
    path = tmp_path / "c.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))  # a safetensors file, but not ours
    with pytest.raises(CheckpointError, match="lacks fedsb checkpoint metadata"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or empty"):
        load_checkpoint(path)
    path.write_text('{"round": 3}')
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    with pytest.raises(CheckpointNotFound) as e:
        load_checkpoint(tmp_path / "absent.safetensors")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, CheckpointError)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path)  # a directory


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.binary(max_size=3000),
    # garbage behind a plausible header length, and JSON-ish headers, to get past the first check
    st.builds(lambda n, b: n.to_bytes(8, "little") + b, st.integers(0, 64), st.binary(max_size=200)),
    st.builds(lambda h, b: len(h).to_bytes(8, "little") + h + b,
              st.sampled_from([b"{}", b'{"__metadata__":{"state":"{}","sha256":"00"}}', b"[]", b"null",
                               b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
                               b'{"__metadata__":{"state":"{}","sha256":"00","format":"other"}}']),
              st.binary(max_size=16)),
))
def test_random_garbage_is_refused(tmp_path, blob):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


# ---------------------------------------------------------------------------------------------------
# compatibility
def test_mismatch_names_the_first_differing_field(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"g": torch.zeros(1)}, {"config": {"model": "bert", "method": "fed-sb", "rank": 4, "seed": 0,
                                                             "target-modules": ["query", "value"], "dp": False}})
    cfg = load_checkpoint(path)[1]["config"]
    check_compatible(cfg, {"model": "bert", "rank": 4, "target-modules": ("query", "value"), "dp": False})  # tuple == list
    check_compatible(cfg, {})
    with pytest.raises(CheckpointMismatch) as e:
        check_compatible(cfg, {"model": "bert", "rank": 8, "seed": 1})
    assert (e.value.field, e.value.expected, e.value.found) == ("rank", 8, 4)
    assert "'rank'" in str(e.value) and "rank=4" in str(e.value) and "rank=8" in str(e.value)
    with pytest.raises(CheckpointMismatch) as e:
        check_compatible(cfg, {"target-modules": ["query", "key"]})
    assert e.value.field == "target-modules"
    with pytest.raises(CheckpointMismatch) as e:
        check_compatible(cfg, {"task": "sst2"})  # absent from the checkpoint
    assert e.value.field == "task" and "no task" in str(e.value)
    with pytest.raises(CheckpointMismatch):
        check_compatible(cfg, {"dp": None})
    e2 = pickle.loads(pickle.dumps(CheckpointMismatch("rank", 8, 4)))
    assert (e2.field, e2.expected, e2.found) == ("rank", 8, 4)


def test_a_checkpoint_without_the_format_tag_is_refused(tmp_path):
    path = tmp_path / "untagged.safetensors"
    _small(path)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del meta["format"]
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(path)


# ---------------------------------------------------------------------------------------------------
# atomicity
def test_crash_at_replace_keeps_the_old_checkpoint_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.safetensors"
    _small(path)
    old = path.read_bytes()

    def boom(*a, **k):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(ckpt.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, {"global": torch.full((6,), 9.0)}, {"round": 2})
    assert path.read_bytes() == old
    assert load_checkpoint(path)[1]["round"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"]


def test_crash_during_fsync_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.safetensors"
    _small(path)
    real_fsync = os.fsync

    def fail_once(fd):
        monkeypatch.setattr(ckpt.os, "fsync", real_fsync)
        raise KeyboardInterrupt  # even a BaseException mid-save leaves the old file whole

    monkeypatch.setattr(ckpt.os, "fsync", fail_once)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"global": torch.full((6,), 9.0)}, {"round": 2})
    assert load_checkpoint(path)[1]["round"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"]
    save_checkpoint(path, {"global": torch.full((6,), 9.0)}, {"round": 2})  # and the next save works
    assert load_checkpoint(path)[1]["round"] == 2


_HALF_WRITE = textwrap.dedent("""
    import os, signal, sys, torch
    from fedsb.run import checkpoint as ckpt
    path = sys.argv[1]
    ckpt.save_checkpoint(path, {"global": torch.zeros(1000)}, {"round": 1})
    real_fdopen = os.fdopen
    class Dying:  # writes half the new file, then the process is SIGKILLed
        def __init__(self, fh): self.fh = fh
        def __enter__(self): return self
        def __exit__(self, *a): return False
        def write(self, b):
            self.fh.write(b[: len(b) // 2]); self.fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt.os.fdopen = lambda fd, mode: Dying(real_fdopen(fd, mode))
    ckpt.save_checkpoint(path, {"global": torch.ones(1000)}, {"round": 2})
""")


def test_sigkill_halfway_through_a_write_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", _HALF_WRITE, str(path)], env=env, capture_output=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()
    tensors, state = load_checkpoint(path)
    assert state == {"round": 1} and torch.equal(tensors["global"], torch.zeros(1000))
    (tmp,) = tmp_path.glob("checkpoint.safetensors.*.tmp")  # the half-written new one
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp)
    save_checkpoint(path, {"global": torch.ones(1000)}, {"round": 2})  # the next save tidies it away
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"]
    assert load_checkpoint(path)[1] == {"round": 2}


_WRITE_FOREVER = textwrap.dedent("""
    import sys, torch
    from fedsb.run.checkpoint import save_checkpoint
    path, i = sys.argv[1], 0
    while True:
        save_checkpoint(path, {"global": torch.full((1 << 20,), float(i))}, {"round": i})  # 4 MiB each
        print(i, flush=True)
        i += 1
""")


def test_sigkill_at_random_moments_always_leaves_a_whole_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = random.Random(0)
    procs = []
    for j in range(3):  # three writers in parallel, each in its own directory
        d = tmp_path / str(j)
        d.mkdir()
        procs.append((d / "checkpoint.safetensors", subprocess.Popen(
            [sys.executable, "-c", _WRITE_FOREVER, str(d / "checkpoint.safetensors")], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    try:
        for path, p in procs:
            assert p.stdout.readline().strip() == "0", p.stderr.read()  # at least one whole checkpoint exists
            time.sleep(rng.uniform(0.0, 0.3))
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=60)
            tensors, state = load_checkpoint(path)
            assert torch.equal(tensors["global"], torch.full((1 << 20,), float(state["round"])))
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
