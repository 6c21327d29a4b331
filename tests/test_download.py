"""download-dtype: the server's round broadcast in int8/int4 codes; the dequantized broadcast is the round's
reference (what clients start from and what each quantized upload is added to)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedsb.config import FedSBConfig
from fedsb.config_text import ConfigError
from fedsb.upload import dequantize_update, upload_bytes
from lab.inprocess_grid import run_inprocess
from tests.conftest import tiny_run_config


@pytest.fixture(autouse=True)
def _empty_basis_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDSB_CACHE_DIR", str(tmp_path / "basis-cache"))


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_a_broadcast_weighs_the_formula_and_every_node_gets_the_same_bytes(dtype):
    from flwr.app import RecordDict

    from server.rounds import Broadcast
    from server.transport import arrays, nbytes

    segments = [32 * 32] * 24 + [2 * 384 + 2]  # a rank-32 Fed-SB on 24 layers and its head
    vec = np.random.default_rng(0).standard_normal(sum(segments)).astype(np.float32)
    size = lambda named: nbytes(RecordDict({"adapter": arrays(**named)}))
    bc = Broadcast(vec, segments, dtype, seed=3, rnd=2)
    overhead = size({"adapter": vec}) - upload_bytes(segments, "float32")
    # the payload is the formula's; what is left is the second array's framing (name, dtype, shape)
    assert 0 <= size(bc.arrays_for(None)) - upload_bytes(segments, dtype) - overhead <= 256
    again = Broadcast(vec, segments, dtype, seed=3, rnd=2)
    assert all(np.array_equal(again.codes[k], bc.codes[k]) for k in bc.codes)  # seeded: a rerun sends the same
    other = Broadcast(vec, segments, dtype, seed=3, rnd=3)
    assert not np.array_equal(other.reference, bc.reference)  # a new draw each round
    qmax = 127 if dtype == "int8" else 7
    assert np.abs(bc.reference - vec).max() <= np.abs(vec).max() / qmax * 1.0001  # within one step of the vector


def test_a_nested_rank_block_of_the_broadcast_dequantizes_to_the_reference_block():
    from server.rounds import Broadcast

    segments, k = [16, 16, 10], 2  # two 4x4 R and a head; a node at rank 2 trains each R's leading 2x2
    index = np.concatenate([np.array([0, 1, 4, 5]), 16 + np.array([0, 1, 4, 5]), 32 + np.arange(10)])
    vec = np.random.default_rng(1).standard_normal(42).astype(np.float32)
    for dtype in ("int8", "int4"):
        bc = Broadcast(vec, segments, dtype, seed=0, rnd=1)
        got = dequantize_update(bc.arrays_for(index), [k * k, k * k, 10], name="adapter")
        assert np.array_equal(got, bc.reference[index])


def _run(tiny_bert, csv, out, nodes=3, client_app=None, **extra):
    run_dir = run_inprocess(tiny_run_config(tiny_bert, csv, out, **extra), nodes, client_app=client_app)
    return run_dir, _records(run_dir), json.loads((run_dir / "summary.json").read_text())


def _down_per_message(recs):
    trains = [r for r in recs if r["phase"] == "train"]
    return sum(r["bytes_down"] for r in trains) / sum(r["clients"] for r in trains)


@pytest.mark.parametrize("method", ["fed-sb", "fedit"])
def test_int8_downloads_complete_a_run_and_its_bytes_show_the_saving(tiny_bert, sentiment_csv, tmp_path, method):
    common = {"method": method, "upload-dtype": "int8", "num-server-rounds": 2,
              **({"init-basis": "weights"} if method == "fed-sb" else {})}
    _, f32_recs, f32 = _run(tiny_bert, sentiment_csv, tmp_path / "f32", **common)
    _, recs, s = _run(tiny_bert, sentiment_csv, tmp_path / "int8", **common, **{"download-dtype": "int8"})
    trains = [r for r in recs if r["phase"] == "train"]
    assert trains and all(r["updated"] and r["replies"] == 3 and r["rejected_count"] == 0 and r["failed"] == 0
                          for r in trains)
    n = s["communicated_params"]
    saved = _down_per_message(f32_recs) - _down_per_message(recs)
    # float32 (4 bytes a number) less int8 (1 byte, plus 4 bytes a tensor's scale and the second array's framing)
    assert 3 * n - 4 * 64 - 256 <= saved <= 3 * n
    assert s["bytes_down_total"] < f32["bytes_down_total"]


def _recording_app(seen: list, corrupt: str | None = None):
    """The real ClientApp, recording each train message's decoded vector and its reply (or corrupting the
    broadcast partition 2 receives)."""
    from flwr.app import Array, ArrayRecord, Context, Message

    from client import app as real
    from tests.hostile_app import real_query_with

    def train(msg: Message, context: Context) -> Message:
        got = {k: v.numpy().copy() for k, v in msg.content["adapter"].items()}
        if corrupt and int(context.node_config["partition-id"]) == 2:
            if corrupt == "truncated":
                got["adapter_i8"] = got["adapter_i8"][:-1]
            else:
                got["adapter_i8"] = got["adapter_i8"].astype(np.float32)
            msg.content["adapter"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in got.items()})
        reply = real.train(msg, context)
        if reply.content["config"].get("status") == "ok":
            up = {k: v.numpy().copy() for k, v in reply.content["adapter"].items()}
            seen.append((int(msg.content["config"]["round"]), got, up, int(reply.content["metrics"]["num-examples"])))
        return reply

    return real_query_with(train)


def _segments(run_config: dict) -> list[int]:
    """The sizes of the run's trainable tensors, as the server cuts its broadcast."""
    from fedsb.methods import method_for
    from fedsb.tasks import get_task

    cfg = FedSBConfig.from_run_config(run_config)
    task, method = get_task(cfg), method_for(cfg)
    model = task.base_model()
    method.build(model, task.layer_names)
    return [t.numel() for t in method.trainable(model).values()]


def _mean(models: list[np.ndarray], weights: list[int]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return (np.stack(models).astype(np.float64) * w[:, None]).sum(0) / w.sum()


def test_the_aggregate_is_the_mean_of_the_models_built_from_the_dequantized_broadcast(tiny_bert, sentiment_csv, tmp_path):
    from fedsb.run.checkpoint import load_checkpoint

    seen: list = []
    extra = {"download-dtype": "int8", "upload-dtype": "int8", "num-server-rounds": 2, "local-steps": 3}
    run_dir, _, _ = _run(tiny_bert, sentiment_csv, tmp_path / "mean", client_app=_recording_app(seen), **extra)
    segments = _segments(tiny_run_config(tiny_bert, sentiment_csv, tmp_path / "mean", **extra))
    by_round = {rnd: [x for x in seen if x[0] == rnd] for rnd in (1, 2)}
    assert [len(v) for v in by_round.values()] == [3, 3]
    aggregates = {}
    for rnd, got in by_round.items():
        assert all(np.array_equal(x[1]["adapter_i8"], got[0][1]["adapter_i8"]) for x in got)  # the same bytes
        reference = dequantize_update(got[0][1], segments, name="adapter")
        deltas = [dequantize_update(up, segments) for _, _, up, _ in got]
        aggregates[rnd] = _mean([reference + d for d in deltas], [w for *_, w in got])
    tensors, _ = load_checkpoint(run_dir / "checkpoint.safetensors")
    final = tensors["global"].numpy()
    np.testing.assert_allclose(final, aggregates[2], rtol=0, atol=1e-6)
    # adding the server's float32 global (round 1's aggregate) instead of the broadcast misses by its rounding
    wrong = _mean([aggregates[1].astype(np.float32) + dequantize_update(up, segments) for _, _, up, _ in by_round[2]],
                  [w for *_, w in by_round[2]])
    assert np.abs(wrong - final).max() > 1e-5


@pytest.mark.parametrize("corrupt, reason", [("truncated", "int8 adapter: got int8 \\(\\d+,\\)"),
                                             ("float-codes", "int8 adapter: got float32")])
def test_a_corrupt_broadcast_is_refused_by_the_client_with_its_reason(tiny_bert, sentiment_csv, tmp_path, caplog,
                                                                       corrupt, reason):
    seen: list = []
    with caplog.at_level("WARNING", logger="fedsb.server"):
        _, recs, _ = _run(tiny_bert, sentiment_csv, tmp_path / corrupt, client_app=_recording_app(seen, corrupt), **{
            "download-dtype": "int8", "num-server-rounds": 1, "local-steps": 2})
    train = next(r for r in recs if r["phase"] == "train")
    assert train["failed"] == 1 and train["replies"] == 2 and train["updated"]
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1
    assert "refusing the server's broadcast (download-dtype=int8)" in failures[0]
    assert __import__("re").search(reason, failures[0]), failures[0]


def test_download_dtype_errors_name_the_key():
    with pytest.raises(ConfigError, match="download-dtype.*int2"):
        FedSBConfig.from_run_config({"download-dtype": "int2"})
    with pytest.raises(ConfigError, match="download-dtype.*secagg"):
        FedSBConfig.from_run_config({"secagg": True, "download-dtype": "int8"})
    assert FedSBConfig.from_run_config({"download-dtype": "int4"}).download_dtype == "int4"
    assert FedSBConfig.from_run_config({}).download_dtype == "float32"


def test_sigkill_and_resume_with_int8_transfers_is_bit_identical(tiny_bert, sentiment_csv, tmp_path):
    """The resumed run draws each broadcast from the checkpointed aggregate with the same (seed, round) noise, so it
    sends the codes the run that was never killed sent (tests/test_resilience.py's crash, here over int8)."""
    import signal

    from tests.test_resilience import _run_sim, kill_once_held

    extra = {"num-server-rounds": 3, "download-dtype": "int8", "upload-dtype": "int8", "local-steps": 5}
    run_inprocess(tiny_run_config(tiny_bert, sentiment_csv, tmp_path / "full", **extra), 3)
    crash_dir = tmp_path / "crash"
    crash = tiny_run_config(tiny_bert, sentiment_csv, crash_dir, **extra)
    proc = _run_sim(crash, 1)  # halted once round 1 is checkpointed
    kill_once_held(proc, crash_dir, 1, 600)
    assert proc.returncode == -signal.SIGKILL and not (crash_dir / "summary.json").exists()
    run_inprocess(dict(crash, resume=True), 3)
    name = "adapter/fedsb_adapter.safetensors"
    assert (crash_dir / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    down = lambda d: [r["bytes_down"] for r in _records(d) if r["phase"] == "train"]
    assert down(crash_dir) == down(tmp_path / "full")  # the same broadcasts, round by round
