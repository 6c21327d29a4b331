"""Issue 31's protocol: a Fed-SB basis every node computes from its own frozen weights (no basis bytes,
the matrices only for a node whose result differs), and round uploads quantized to int8/int4."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedsb.config import FedSBConfig
from fedsb.config_text import ConfigError
from fedsb.upload import upload_bytes
from tests.conftest import tiny_run_config
from lab.inprocess_grid import run_inprocess


@pytest.fixture(autouse=True)
def _empty_basis_cache(monkeypatch, tmp_path):
    """A node that cached a basis in an earlier run would never compute it: each test starts without."""
    monkeypatch.setenv("FEDSB_CACHE_DIR", str(tmp_path / "basis-cache"))


def _run(tiny_bert, csv, out, nodes=3, **extra):
    run_dir = run_inprocess(tiny_run_config(tiny_bert, csv, out, **extra), nodes)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return recs, json.loads((run_dir / "summary.json").read_text())


def test_weights_basis_is_computed_by_every_node_and_sends_no_basis_bytes(tiny_bert, sentiment_csv, tmp_path):
    recs, s = _run(tiny_bert, sentiment_csv, tmp_path / "w", **{"init-basis": "weights"})
    init = next(r for r in recs if r["phase"] == "init")
    assert init["init_basis"] == "weights" and init["bytes_up"] == 0 and init["bytes_down"] == 0
    trains = [r for r in recs if r["phase"] == "train"]
    assert trains and all(r["basis_resent"] == 0 and r["rejected_count"] == 0 and r["replies"] == 3 for r in trains)
    assert s["bytes_basis_total"] == 0 and s["bytes_one_time_per_client"] == 0
    assert s["basis_fallback_nodes"] == 0 and s["basis_fallback_rate"] == 0
    assert s["final_loss"] < s["initial_loss"]  # it learns


def test_a_node_whose_weights_basis_differs_is_sent_the_matrices(tiny_bert, sentiment_csv, tmp_path, monkeypatch):
    # the first node to compute the basis gets a slightly different W0 (as another LAPACK or a modified
    # copy of the model would give it): its fingerprint disagrees and it falls back to the matrices
    import fedsb.methods.fed_sb as fed_sb
    import server.basis  # noqa: F401 (binds the server's own, unpatched bases_from_weights first)

    real, calls = fed_sb.bases_from_weights, []

    def perturbed_once(task, model=None):
        bases = real(task, model)
        calls.append(1)
        if len(calls) == 1:
            for b in bases.values():
                b.B = b.B.flip(1)  # other directions, same shapes
        return bases

    monkeypatch.setattr(fed_sb, "bases_from_weights", perturbed_once)
    recs, s = _run(tiny_bert, sentiment_csv, tmp_path / "fb", **{"init-basis": "weights-minor", "num-server-rounds": 2})
    trains = [r for r in recs if r["phase"] == "train"]
    assert trains[0]["basis_resent"] == 1 and trains[0]["replies"] == 3 and trains[0]["rejected_count"] == 0
    assert s["basis_fallback_nodes"] == 1 and s["basis_fallback_rate"] == pytest.approx(1 / 3)
    assert s["bytes_basis_total"] > 0 and s["bytes_one_time_per_client"] > 0


def _reply_bytes(vec_size: int, arrays: dict) -> int:
    from client.handlers import train_reply_content
    from server.transport import nbytes

    return nbytes(train_reply_content(arrays, {"num-examples": 100, "train-loss": 0.5}, "f" * 32))


@pytest.mark.parametrize("dtype, ratio", [("int8", 0.27), ("int4", 0.14)])
def test_quantized_upload_bytes_match_the_formula_and_the_ratio(dtype, ratio):
    # a vector the size of a rank-32 Fed-SB on 24 layers: message framing no longer dominates
    from fedsb.upload import quantize_update

    segments = [32 * 32] * 24 + [2 * 384 + 2]
    delta = np.random.default_rng(0).standard_normal(sum(segments)).astype(np.float32)
    f32 = _reply_bytes(delta.size, {"adapter": delta})
    q = _reply_bytes(delta.size, quantize_update(delta, segments, dtype, np.random.default_rng(1)))
    overhead = f32 - upload_bytes(segments, "float32")
    # the quantized payload is the formula's; what is left is a second array's framing (its name, dtype,
    # shape: a few hundred bytes whatever the vector's size)
    assert 0 <= q - upload_bytes(segments, dtype) - overhead <= 256
    assert q <= ratio * f32


@pytest.fixture(scope="module")
def float32_run(tiny_bert, sentiment_csv, tmp_path_factory):
    """The float32 reference of the quantized runs, run once for both (with its own empty basis cache)."""
    base = tmp_path_factory.mktemp("f32")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDSB_CACHE_DIR", str(base / "basis-cache"))
        return _run(tiny_bert, sentiment_csv, base / "run", **{"rank": 16})[1]


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_uploads_in_a_run_weigh_the_formula_and_learn(tiny_bert, sentiment_csv, tmp_path, dtype, float32_run):
    f32 = float32_run
    recs, s = _run(tiny_bert, sentiment_csv, tmp_path / dtype, **{"rank": 16, "upload-dtype": dtype})
    trains = [r for r in recs if r["phase"] == "train"]
    assert all(r["rejected_count"] == 0 and r["replies"] == 3 for r in trains)
    assert s["bytes_up_floor_per_client_round"] == f32["bytes_up_floor_per_client_round"]  # the float32 floor
    n = s["communicated_params"]
    # the measured upload less the payload is the float32 reply's overhead, plus the second array's framing
    overhead_f32 = f32["bytes_up_per_client_round"] - 4 * n
    codes = n if dtype == "int8" else (n + 1) // 2
    left = s["bytes_up_per_client_round"] - overhead_f32 - codes  # the scales (4 bytes a tensor) and their framing
    assert 0 < left <= 4 * 64 + 256
    assert all(r["updated"] for r in trains)
    if dtype == "int8":  # int4's coarser rounding needs more than the tiny run's 3 rounds to show it
        assert s["final_loss"] < s["initial_loss"]


# a corrupt int8 upload of partition 2, one kind a round, and the reason the server must give
CORRUPTIONS = {1: ("negative-scale", "quantization"), 2: ("truncated-codes", "shape"), 3: ("float-codes", "dtype"),
               4: ("no-scales", "missing-key"), 5: ("code-128", "quantization")}


def _corrupting_app():
    from flwr.app import Array, ArrayRecord, Context, Message

    from client import app as real
    from tests.hostile_app import real_query_with

    def train(msg: Message, context: Context) -> Message:
        reply = real.train(msg, context)
        if int(context.node_config["partition-id"]) != 2 or reply.content["config"].get("status") != "ok":
            return reply
        kind = CORRUPTIONS[int(msg.content["config"]["round"])][0]
        got = {k: v.numpy().copy() for k, v in reply.content["adapter"].items()}
        if kind == "negative-scale":
            got["update_scale"][0] = -got["update_scale"][0]
        elif kind == "truncated-codes":
            got["update_i8"] = got["update_i8"][:-1]
        elif kind == "float-codes":
            got["update_i8"] = got["update_i8"].astype(np.float32)
        elif kind == "no-scales":
            del got["update_scale"]
        elif kind == "code-128":
            got["update_i8"][0] = -128
        reply.content["adapter"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in got.items()})
        return reply

    return real_query_with(train)


def test_corrupt_quantized_replies_are_refused_with_their_reason(tiny_bert, sentiment_csv, tmp_path):
    cfg = tiny_run_config(tiny_bert, sentiment_csv, tmp_path / "bad", **{
        "upload-dtype": "int8", "num-server-rounds": len(CORRUPTIONS), "local-steps": 2})
    run_dir = run_inprocess(cfg, 3, client_app=_corrupting_app())
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trains = {r["round"]: r for r in recs if r["phase"] == "train"}
    for rnd, (kind, reason) in CORRUPTIONS.items():
        assert [x["reason"] for x in trains[rnd]["rejected"]] == [reason], kind
        assert trains[rnd]["replies"] == 2 and trains[rnd]["updated"]


def test_secagg_refuses_quantized_uploads():
    with pytest.raises(ConfigError, match="upload-dtype.*secagg"):
        FedSBConfig.from_run_config({"secagg": True, "upload-dtype": "int8"})
    FedSBConfig.from_run_config({"secagg": True, "upload-dtype": "float32"})


def test_weights_basis_and_int8_uploads_under_dp_spend_nothing_on_the_init(tiny_bert, sentiment_csv, tmp_path):
    # no init query and no init step in the accountant; the quantized (OS-entropy rounded) noised updates
    # and nested ranks are accepted like float32 ones
    recs, s = _run(tiny_bert, sentiment_csv, tmp_path / "dp", **{
        "init-basis": "weights", "upload-dtype": "int8", "dp": True, "target-epsilon": 8.0,
        "num-server-rounds": 1, "local-steps": 3, "client-ranks": "2,4"})
    init = recs[0]
    assert init["phase"] == "init" and init["clients"] == 0 and init["bytes_down"] == 0
    assert all(h[2] != 1 for h in s["dp_history"]) and sum(h[2] for h in s["dp_history"]) == 3
    trains = [r for r in recs if r["phase"] == "train"]
    assert all(r["rejected_count"] == 0 and r["replies"] == 3 and r["basis_resent"] == 0 for r in trains)
    assert s["bytes_basis_total"] == 0


_FINGERPRINT = """
import sys
from fedsb.config import FedSBConfig
from fedsb.methods.fed_sb import bases_from_weights
from fedsb.tasks import get_task
from fedsb.wire import basis_fingerprint
for basis in ("weights", "weights-minor"):
    cfg = FedSBConfig.from_run_config(dict([a.split("=", 1) for a in sys.argv[1:]] + [("init-basis", basis)]))
    task = get_task(cfg)
    print(basis_fingerprint(task.model_id, cfg.rank, {n: (b.B, b.A) for n, b in bases_from_weights(task).items()}))
"""


def test_weights_basis_is_identical_on_two_processes(tiny_bert, sentiment_csv, tmp_path):
    import os
    import subprocess
    import sys

    run = tiny_run_config(tiny_bert, sentiment_csv, tmp_path / "fp", **{"basis-dtype": "float32"})
    args = [f"{k}={v}" for k, v in run.items() if k in ("model", "dataset", "text-column", "label-column",
                                                        "rank", "basis-dtype")]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # another thread count: another blocking of the SVD's sums
    # each process prints the fingerprint of both weight bases (one process start each, not one per basis)
    out = [subprocess.run([sys.executable, "-c", _FINGERPRINT, *args], env=e, capture_output=True, text=True,
                          check=True).stdout.split() for e in (env, dict(env, OMP_NUM_THREADS="2"))]
    assert len(out[0]) == 2 and all(len(fp) == 32 for fp in out[0]) and out[0] == out[1]
