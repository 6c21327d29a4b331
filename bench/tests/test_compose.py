"""bench/compose.py: its ServerApps (Flower's user-level DP wrapper, ServerAdam around fedsb's strategy) run
through ``fedsb compare --server-app ... --backend inprocess``, as BENCHMARKS.md's commands do."""

from __future__ import annotations

import json
import math

import pytest

from lab.tiny import make_sentiment_csv, make_tiny_bert, tiny_run_config


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def sentiment_csv(tmp_path_factory):
    return make_sentiment_csv(tmp_path_factory.mktemp("data") / "sentiment.csv")


@pytest.mark.parametrize("app", ["user_dp", "adam_1e_2"])
def test_compare_runs_a_composed_server_app_over_the_inprocess_backend(tiny_bert, sentiment_csv, tmp_path, monkeypatch, app):
    """--backend inprocess never starts Ray, and --server-app's ServerApp is the one that runs: the user-level DP
    wrapper reports its ε (bench.compose), ServerAdam moves the aggregate off the plain mean (a different model)."""
    from server.cli import main

    monkeypatch.setattr("server.simulation.simulate", lambda *a, **k: pytest.fail("Ray simulation started"))
    rc = tiny_run_config(tiny_bert, sentiment_csv, tmp_path / "unused", **{"num-server-rounds": 2, "local-steps": 3,
                                                                           "min-available-nodes": 3})
    for key in ("output-dir", "rank", "learning-rate"):
        rc.pop(key)
    text = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in rc.items())
    summaries = {}
    for name, extra in (("plain", []), (app, ["--server-app", f"bench.compose:{app}"])):
        out = tmp_path / name
        assert main(["compare", "--methods", "fed-sb", "--num-supernodes", "3", "--out", str(out), "--run-config", text,
                     "--rank", "fed-sb=4", "--lr", "fed-sb=0.05", "--validation-fraction", "0", "--backend",
                     "inprocess", *extra]) == 0
        summaries[name] = json.loads(next(out.glob("runs/*/summary.json")).read_text())
    if app == "user_dp":
        dp = summaries[app]["central_dp"]
        assert dp["rounds"] == 2 and dp["noise_multiplier"] == 1.0 and math.isfinite(dp["epsilon"]) and dp["epsilon"] > 0
        assert "central_dp" not in summaries["plain"]
    assert summaries[app]["final_accuracy"] != summaries["plain"]["final_accuracy"] or \
        summaries[app]["final_loss"] != summaries["plain"]["final_loss"]
