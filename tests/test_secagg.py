"""SecAgg+ over R: equals the plain weighted mean within the derived quantization bound, the server's
aggregation only ever sees the aggregate, dropouts after key sharing are recovered, accuracy holds."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.conftest import tiny_run_config


def _records(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final_vector(run_dir) -> np.ndarray:
    from safetensors.torch import load_file as lf

    return lf(str(run_dir / "checkpoint.safetensors"))["global"].numpy().astype(np.float64)


@pytest.fixture(scope="module")
def secagg_runs(tiny_bert, sentiment_csv, tmp_path_factory):
    from lab.inprocess_grid import run_inprocess
    from tests.hostile_app import recording, recording_with_dropout

    base = tmp_path_factory.mktemp("secagg")
    out = {}
    for name, app, n in (("one-round", recording, 3), ("dropout", recording_with_dropout, 4)):
        dump = base / f"dump-{name}"
        dump.mkdir()
        os.environ["FEDSB_TEST_DUMP"] = str(dump)
        cfg = tiny_run_config(tiny_bert, sentiment_csv, base / name, **{
            "secagg": True, "num-server-rounds": 1, "fraction-train": 1.0, "secagg-shares": 3,
            "secagg-threshold": 2, "min-available-nodes": n})
        out[name] = (run_inprocess(cfg, n, client_app=app), dump)
    plain = run_inprocess(tiny_run_config(tiny_bert, sentiment_csv, base / "plain"), 3)
    secure = run_inprocess(tiny_run_config(tiny_bert, sentiment_csv, base / "secure", secagg=True), 3)
    out["plain"], out["secure"] = plain, secure
    return out


def test_secure_aggregate_equals_plain_mean_within_bound(secagg_runs):
    from server.secagg import quantization_error_bound

    run_dir, dump = secagg_runs["one-round"]
    rows = [np.load(p) for p in sorted(dump.glob("r1-p*.npy"))]
    weights, vecs = [r[0] for r in rows], [r[1:] for r in rows]
    assert len(vecs) == 3
    plain = sum(w * v for w, v in zip(weights, vecs)) / sum(weights)
    secure = _final_vector(run_dir)
    s = json.loads((run_dir / "summary.json").read_text())
    cfg = s["config"]
    assert np.abs(np.concatenate(vecs)).max() < cfg["secagg-clip-range"]  # the bound assumes no clipping
    bound = quantization_error_bound(3, weights, max(weights), cfg["secagg-clip-range"],
                                     cfg["secagg-quantization-range"], float(np.abs(np.concatenate(vecs)).max()))
    err = float(np.abs(secure - plain).max())
    assert err <= bound, (err, bound)
    assert bound < 1e-4  # and the bound is small: the secure mean is the mean for all practical purposes
    assert s["secagg"] is True and s["secagg_settings"]["shares"] == 3


def test_aggregation_never_sees_a_single_client_vector(secagg_runs):
    run_dir, dump = secagg_runs["one-round"]
    train = [r for r in _records(run_dir) if r["phase"] == "train"]
    assert train and all(r["strategy_saw_only_aggregate"] for r in train)
    secure = _final_vector(run_dir)
    for p in dump.glob("r1-p*.npy"):  # no client's own vector is what the server ended up with
        assert not np.allclose(np.load(p)[1:], secure, atol=1e-6)


def test_dropout_after_key_sharing_is_recovered(secagg_runs):
    run_dir, dump = secagg_runs["dropout"]
    (train,) = [r for r in _records(run_dir) if r["phase"] == "train"]
    assert train["clients"] == 4 and train["replies"] == 3 and train["updated"]
    assert train["dropouts_recovered"] == 1
    rows = [np.load(p) for p in sorted(dump.glob("r1-p*.npy"))]
    plain = sum(r[0] * r[1:] for r in rows) / sum(r[0] for r in rows)
    assert np.abs(_final_vector(run_dir) - plain).max() < 1e-4  # the survivors' mean, masks of the dropout removed


def test_secagg_accuracy_matches_plain(secagg_runs):
    plain = json.loads((secagg_runs["plain"] / "summary.json").read_text())
    secure = json.loads((secagg_runs["secure"] / "summary.json").read_text())
    assert abs(plain["final_accuracy"] - secure["final_accuracy"]) <= 0.02
    assert secure["bytes_up_total"] > plain["bytes_up_total"]  # the protocol's key exchange costs bytes
