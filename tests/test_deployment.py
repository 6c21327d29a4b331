"""The same app under Flower's Deployment Engine, on loopback: SuperLink with TLS and SuperNode
authentication, three registered SuperNodes, ``flwr run``; one node killed mid-run, then restarted with
empty state and an empty basis cache; an unregistered key refused. Real processes, stopped by pid."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import tiny_run_config
from lab.deployment_harness import Federation

pytestmark = pytest.mark.deployment


def _records(path):
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def federation(tmp_path):
    fed = Federation(tmp_path / "fed", num_nodes=3)
    yield fed
    fed.stop()
    assert all(p.poll() is not None for p in fed.procs.values())


def test_tls_auth_federation_survives_lost_and_restarted_node(federation, tiny_bert, sentiment_csv, tmp_path):
    fed = federation
    fed.start_superlink()
    for i in range(3):
        assert fed.register(i).returncode == 0
    # a SuperNode whose key was never registered is refused
    intruder = fed.start_supernode(3)
    for i in range(3):
        fed.start_supernode(i)
    out = tmp_path / "run"
    run_id = fed.run(tiny_run_config(tiny_bert, sentiment_csv, out, **{
        "num-server-rounds": 4, "local-steps": 5, "init-samples": 16, "fraction-train": 1.0, "min-train-nodes": 2,
        "min-available-nodes": 3, "round-timeout": 90.0}))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not any(r["phase"] == "train" and r["round"] == 1 for r in _records(metrics)):
        assert time.time() < deadline, fed.log("superlink")[-3000:]
        time.sleep(1)
    fed.kill("supernode-2")  # lost mid-run
    while not any(r["phase"] == "train" and r["round"] == 2 for r in _records(metrics)):
        assert time.time() < deadline
        time.sleep(1)
    fed.start_supernode(2, cache_dir=tmp_path / "empty-cache")  # back, with no state and no cached basis
    status = fed.wait(run_id, timeout=400)
    assert status == "finished:completed", status
    summary = json.loads((out / "summary.json").read_text())
    train = {r["round"]: r for r in _records(metrics) if r["phase"] == "train"}
    assert train[1]["replies"] == 3 and train[1]["bytes_basis"] > 0
    assert train[2]["failed"] >= 1 and train[2]["replies"] == 2 and train[2]["updated"]
    # the restarted node said it lacked the basis, got it again, and its reply counted
    assert sum(r["basis_resent"] for r in train.values()) >= 1
    assert train[4]["replies"] == 3
    assert summary["rounds"] == 4 and summary["final_accuracy"] is not None
    assert intruder.wait(timeout=60) != 0  # refused: the SuperLink answers 412 to an unregistered key
    assert "Failed to activate SuperNode" in fed.log("supernode-3")
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in fed.log("superlink")
    assert not any(r.get("clients") == 4 for r in train.values())  # the intruder never joined a round


def test_warm_start_forks_every_clientapp_process(tiny_bert, sentiment_csv, tmp_path):
    """With warm start (client/warm_start.py) each SuperNode's ClientApp processes are forked by its warm
    process instead of started cold: the run completes, every message of both nodes went through a fork,
    and no shim fell back to the real flwr-clientapp."""
    fed = Federation(tmp_path / "fed", num_nodes=2, warm=True)
    out = tmp_path / "run"
    try:
        fed.start_superlink()
        for i in range(2):
            assert fed.register(i).returncode == 0
            fed.start_supernode(i)
        run_id = fed.run(tiny_run_config(tiny_bert, sentiment_csv, out, **{
            "num-server-rounds": 2, "local-steps": 3, "init-samples": 16, "fraction-train": 1.0, "min-train-nodes": 2,
            "min-available-nodes": 2, "round-timeout": 90.0}))
        assert fed.wait(run_id, timeout=300) == "finished:completed"
    finally:
        fed.stop()
    train = [r for r in _records(out / "metrics.jsonl") if r["phase"] == "train"]
    assert len(train) == 2 and all(r["replies"] == 2 and r["failed"] == 0 for r in train)
    forks = [fed.log(f"warm-{i}").count("forked pid") for i in range(2)]
    # hello and two train messages each, and the init query to the node(s) init-fraction asked
    assert min(forks) >= 3 and sum(forks) >= 7, forks
    assert not any("running the real flwr-clientapp" in fed.log(f"supernode-{i}") for i in range(2))


def test_warm_child_forgets_the_installed_app_so_flower_loads_the_fabs():
    """The warm process imported `client` and `server` to start; a forked child drops them (and `fedsb`) so
    that Flower imports `client.app` from the run's FAB, and keeps the preloaded third-party modules."""
    import subprocess
    import sys

    code = ("import sys, torch, client.warm_start as w, server.cli, fedsb.config; gone = w.forget_app_modules(); "
            "left = [m for m in sys.modules if m.split('.')[0] in w.APP_PACKAGES]; "
            "print(len(gone) > 3, left, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")[0]
    assert out == "True [] True"


def test_warm_shim_runs_the_real_clientapp_without_a_warm_process(tmp_path):
    import os
    import subprocess
    import sys

    from client.warm_start import SHIM

    env = dict(os.environ, FEDSB_WARM_SOCKET=str(tmp_path / "absent.sock"),
               PATH=f"{SHIM.parent}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    res = subprocess.run([str(SHIM), "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "usage: flwr-clientapp" in res.stdout
    assert "running the real flwr-clientapp" in res.stderr


def test_superlink_restarted_mid_run_resumes_from_the_last_checkpoint(tiny_bert, sentiment_csv, tmp_path):
    """The SuperLink (state database on a file) is SIGKILLed after a round's checkpoint and started again on the
    same database; the SuperNodes reconnect on their own (same keys, so the same node ids); the run submitted
    again with resume=true is a new Flower run that continues the same output-dir from its last checkpoint:
    each round is in metrics.jsonl once, the rounds before the kill as they were written."""
    from fedsb.config import ConfigError
    from fedsb.run.checkpoint import CheckpointError, load_checkpoint
    from fedsb.run.records import CHECKPOINT, lock_run_dir

    def checkpoint_round() -> int:
        try:
            return int(load_checkpoint(out / CHECKPOINT)[1]["round"])
        except CheckpointError:  # none yet
            return -1

    fed = Federation(tmp_path / "fed", num_nodes=2)
    out, rounds = tmp_path / "run", 3
    cfg = tiny_run_config(tiny_bert, sentiment_csv, out, **{
        "num-server-rounds": rounds, "local-steps": 3, "init-samples": 16, "fraction-train": 1.0,
        "min-train-nodes": 2, "min-available-nodes": 2})  # round-timeout 300 s: a ClientApp may start slowly here
    try:
        fed.start_superlink()
        for i in range(2):
            assert fed.register(i).returncode == 0
            fed.start_supernode(i)
        first = fed.run(cfg)
        deadline = time.time() + 600
        while checkpoint_round() < 1:  # round 1 trained and checkpointed
            assert time.time() < deadline and not fed.status(first).startswith("finished"), \
                fed.flwr("log", str(first), "fedsb-test", "--show").stdout[-3000:]  # the ServerApp's log
            time.sleep(1)
        # With subprocess isolation the ServerApp runs under the SuperLink's executor, started with --parent-pid:
        # both end when the SuperLink dies, after the ServerApp reports its end to the next SuperLink.
        fed.kill("superlink")
        fed.start_superlink()  # same port, same state.db
        deadline = time.time() + 300
        while not (old := fed.status(first)).startswith("finished"):
            assert time.time() < deadline, f"run {first} still {old!r}: {fed.log('superlink')[-3000:]}"
            time.sleep(1)
        assert old == "finished:failed", old
        while True:  # the old ServerApp has let go of the run directory: nobody writes there now
            try:
                lock_run_dir(out, wait=0).close()
                break
            except ConfigError:
                assert time.time() < deadline, "the old ServerApp still holds the run directory"
                time.sleep(0.5)
        k = checkpoint_round()  # what the resume continues from
        kept = [r for r in _records(out / "metrics.jsonl") if r["round"] <= k]
        assert 1 <= k < rounds
        second = fed.run(dict(cfg, resume=True))
        assert second != first  # a new Flower run; fedsb's resume keys on output-dir
        assert fed.wait(second, timeout=500) == "finished:completed"
    finally:
        fed.stop()
    recs = _records(out / "metrics.jsonl")
    assert recs[:len(kept)] == kept  # the rounds up to the checkpoint as written before the kill
    assert [r["round"] for r in recs if r["phase"] == "train"] == list(range(1, rounds + 1))  # none lost, none twice
    assert [r["phase"] for r in recs].count("init") == 1  # no second initialization
    # the SuperNodes reconnected to the restarted SuperLink and both replied in every resumed round
    assert all(r["replies"] == 2 and r["failed"] == 0 for r in recs if r["phase"] == "train" and r["round"] > k)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == rounds and summary["final_accuracy"] is not None
    assert summary["seconds_this_session"] < summary["seconds"]  # the run's clock went on from the checkpoint
