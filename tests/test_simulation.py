"""A real Flower simulation (Ray, ServerApp, ClientApps) of a tiny BERT on a learnable task: the suite's Ray
smoke test, and the reference the in-process grid of the protocol tests must reproduce."""

from __future__ import annotations

import json
from importlib.metadata import version

import pytest

from tests.conftest import tiny_run_config


@pytest.fixture(scope="module")
def fedsb_run(ray_run):
    run_dir, _ = ray_run  # tests/conftest.py: `fedsb simulate`, 3 nodes, 3 rounds, federated evaluation
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return run_dir, records, summary


def test_accuracy_well_above_chance(fedsb_run):
    _, records, summary = fedsb_run
    assert summary["final_accuracy"] >= 0.8, summary
    first = next(r for r in records if r["phase"] == "evaluate" and r["round"] == 0)
    assert summary["final_loss"] < first["loss"]


def test_only_r_and_head_travel_after_init(fedsb_run):
    _, records, summary = fedsb_run
    # 2 layers x 6 targets x r^2 + head (2x32 + 2), 4 bytes each: the floor of a Fed-SB upload
    floor = 4 * summary["communicated_params"]
    assert summary["communicated_params"] == 12 * 4 * 4 + 2 * 32 + 2
    for r in records:
        if r["phase"] == "train":
            assert r["bytes_up_per_client"] <= 1.10 * floor + 1024, r  # measured, framing included
            assert r["bytes_up_per_client"] >= floor
    assert summary["bytes_up_per_client_round"] <= 1.10 * floor + 1024


def test_each_node_got_the_basis_once(fedsb_run):
    _, records, summary = fedsb_run
    train = [r for r in records if r["phase"] == "train"]
    assert train[0]["bytes_basis"] > 0
    assert all(r["bytes_basis"] == 0 for r in train[1:])  # all 3 nodes sampled in round 1 (fraction 1.0)
    # the basis: B and A of every layer in basis-dtype, once for each of the 3 nodes (plus framing and the int8
    # scales: about 1 KB per message on this tiny model)
    from safetensors.torch import load_file

    saved = load_file(str(fedsb_run[0] / "adapter" / "fedsb_adapter.safetensors"))
    per_entry = {"float32": 4, "bfloat16": 2, "int8": 1, "int4": 0.5}[summary["config"]["basis-dtype"]]
    per_node = sum(per_entry * t.numel() for k, t in saved.items() if k.endswith((".sb_B", ".sb_A")))
    assert 3 * per_node <= summary["bytes_basis_total"] <= 3 * (per_node + 2048)


def test_run_directory_contract(fedsb_run):
    run_dir, records, summary = fedsb_run
    phases = {(r["round"], r["phase"]) for r in records}
    assert (0, "init") in phases and (0, "evaluate") in phases
    for k in range(1, 4):
        assert (k, "train") in phases and (k, "evaluate") in phases
    # values, not just keys: RunRecorder pre-fills every common key with None, so presence proves nothing
    for r in records:
        assert r["method"] == "fed-sb" and isinstance(r["seconds"], float) and r["seconds"] >= 0, r
        assert isinstance(r["bytes_up"], int) and isinstance(r["bytes_down"], int), r
        if r["phase"] == "evaluate":
            assert 0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0 and r["examples"] == 120, r  # 20% of 600
        if r["phase"] == "train":
            assert r["loss"] > 0 and r["clients"] == 3 and r["replies"] == 3 and r["updated"] is True, r
            assert r["bytes_up"] > 0 and r["bytes_down"] > r["bytes_basis"] >= 0 and r["rejected_count"] == 0, r
        if r["phase"] == "init":
            # init-fraction 0.5 (the default): ceil(1.5) = 2 of the 3 nodes are asked, 32 examples each
            assert r["clients"] == 2 and r["accepted"] == 2 and r["bytes_up"] > 0 and r["examples"] == 64, r
    train = [r for r in records if r["phase"] == "train"]
    init = next(r for r in records if r["phase"] == "init")
    assert summary["method"] == "fed-sb" and summary["rounds"] == 3
    assert summary["final_accuracy"] == [r for r in records if r["phase"] == "evaluate"][-1]["accuracy"]
    phased = init["bytes_up"] + sum(r["bytes_up"] for r in records if r["phase"] in ("train", "federated-evaluate"))
    # the rest: the 3 nodes' small hello replies (partition, size, and their model's content id and path)
    assert 0 < summary["bytes_up_total"] - phased < 3 * 500
    assert summary["bytes_init_total"] == init["bytes_up"] > 0
    assert summary["trainable_params"] == summary["communicated_params"] > 0
    assert summary["config"]["rank"] == 4 and summary["config"]["output-dir"] == str(run_dir)
    assert summary["versions"]["flwr"] == version("flwr") and summary["fingerprint"] == init["fingerprint"]
    assert (run_dir / "adapter" / "fedsb_adapter.safetensors").is_file()
    assert (run_dir / "adapter" / "peft" / "adapter_config.json").is_file()
    assert (run_dir / "adapter" / "peft" / "adapter_model.safetensors").is_file()
    assert (run_dir / "checkpoint.safetensors").is_file()


def test_federated_evaluation_reports_weighted_client_metrics(fedsb_run):
    _, records, summary = fedsb_run
    fed = [r for r in records if r["phase"] == "federated-evaluate"]
    assert [r["round"] for r in fed] == [1, 2, 3]
    assert all(r["clients"] == 3 and 0.0 <= r["accuracy"] <= 1.0 and r["examples"] > 0 for r in fed)
    assert fed[-1]["accuracy"] >= 0.8


@pytest.mark.parametrize("key", ["dataset", "model", "init-dataset"])
def test_a_missing_file_fails_before_flower_starts(monkeypatch, tiny_bert, sentiment_csv, tmp_path, key):
    """A typo'd path is refused by its key before the simulation runtime is touched (it used to surface as
    Flower's "Queue timeout. No context received." once every node had failed to read it)."""
    from client import flower_private
    from fedsb.config import ConfigError
    from server.simulation import simulate

    def flower_started(**kwargs):
        raise AssertionError("Flower's simulation started with a missing file")

    monkeypatch.setattr(flower_private, "_run_simulation", flower_started)
    extra = {"init-source": "server"} if key == "init-dataset" else {}
    cfg = tiny_run_config(tiny_bert, sentiment_csv, tmp_path / "out", **extra, **{key: str(tmp_path / "typo.csv")})
    with pytest.raises(ConfigError, match=rf"'{key}': .*typo\.csv"):
        simulate(cfg, 2)


def test_the_inprocess_grid_reproduces_this_ray_run(fedsb_run, tmp_path):
    """The protocol tests run over ``lab.inprocess_grid``: given this run's config it must produce this run,
    every metric, byte count and tensor bit for bit, or what those tests check is not what Ray runs."""
    from lab.same_run import compare
    from lab.inprocess_grid import run_inprocess

    run_dir, _, summary = fedsb_run
    mine = run_inprocess(dict(summary["config"], **{"output-dir": str(tmp_path / "inprocess")}), 3)
    # peak memory is the process's: Ray's worker against this test process
    assert [d for d in compare(run_dir, mine) if "client_peak_memory" not in d] == []
