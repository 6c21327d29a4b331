"""The same app under Flower's Deployment Engine, on loopback: SuperLink with TLS and SuperNode
authentication, three registered parties, each with its own data file (and one with its model at another
path), a server that holds no client data, ``flwr run``; a fourth party whose model differs in one weight
refused; one node lost mid-round, then restarted with empty state and an empty basis cache; an unregistered
key refused. Real processes, stopped by pid."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from flwr.app import Context, RecordDict

from client.handlers import FedSBClient
from fedsb.config import FedSBConfig
from fedsb.tasks import get_task
from lab.tiny import copy_with_changed_weight, make_sentiment_csv
from tests.conftest import tiny_run_config
from lab.deployment_harness import Federation

pytestmark = pytest.mark.deployment


def _records(path):
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def federation(tmp_path):
    fed = Federation(tmp_path / "fed", num_nodes=4)
    yield fed
    fed.stop()
    assert all(p.poll() is not None for p in fed.procs.values())


def _parties(tiny_bert, tmp_path) -> list[dict]:
    """Each party's --node-config: its own file (a different size and label mix, one of them JSONL); party 1
    keeps the model at another path (same weights), party 3 holds a model with one weight changed."""
    files = [(60, 0.5, "csv"), (90, 0.8, "jsonl"), (45, 0.2, "csv"), (50, 0.5, "csv")]
    parties = [{"dataset": str(make_sentiment_csv(tmp_path / f"party{i}.{ext}", n=n, seed=30 + i, positive_rate=rate))}
               for i, (n, rate, ext) in enumerate(files)]
    parties[1]["model"] = str(shutil.copytree(tiny_bert, tmp_path / "party1-model"))
    parties[3]["model"] = str(copy_with_changed_weight(tiny_bert, tmp_path / "party3-model"))
    return parties


def _train_examples(run_config: dict, parties: list[dict]) -> set[tuple[int, int]]:
    """(partition id, training examples) of each party as its node computes them: its file less its held-out slice."""
    full = FedSBConfig.from_run_config(run_config).to_run_config()
    out = set()
    for i, party in enumerate(parties):
        context = Context(run_id=1, node_id=1, node_config={"partition-id": i, "num-partitions": 4, **party},
                          state=RecordDict(), run_config=full)
        cfg, task, node = FedSBClient().setup(context)
        out.add((i, len(FedSBClient.train_dataset(task, cfg, node))))
    return out


def test_parties_with_own_data_survive_a_lost_node_and_refuse_another_model(federation, tiny_bert, tmp_path):
    fed, parties = federation, _parties(tiny_bert, tmp_path)
    fed.start_superlink()
    for i in range(4):
        assert fed.register(i).returncode == 0
    # a SuperNode whose key was never registered is refused
    intruder = fed.start_supernode(4)
    for i in range(4):
        fed.start_supernode(i, node_config=parties[i])
    out = tmp_path / "run"
    run_config = tiny_run_config(tiny_bert, tmp_path / "unused.csv", out, **{
        "dataset": "none", "labels": "neg,pos", "eval-dataset": str(make_sentiment_csv(tmp_path / "server-eval.csv", n=40)),
        "num-server-rounds": 3, "local-steps": 5, "init-samples": 16, "fraction-train": 1.0, "min-train-nodes": 2,
        "min-available-nodes": 4, "round-timeout": 300.0})  # nothing waits it out: a bound for a loaded machine
    run_id = fed.start_run(run_config)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600  # a bound, not a measurement: four parties' start-ups on a busy machine
    # lost mid-round: node 2 leaves once it holds its round-2 train message (its second), so round 2 counts
    # it (it was connected when the round began) and its reply never comes. It leaves as SIGTERM stops it:
    # the SuperLink answers the round for it with Flower's node-unavailable error at once, where a SIGKILLed
    # node is only noticed when its heartbeat runs out (up to 60 s; see Federation.leave).
    while fed.log("supernode-2").count("Receiving: train message") < 2:
        assert time.time() < deadline, fed.log("superlink")[-3000:]
        time.sleep(0.2)
    fed.leave("supernode-2")
    while not any(r["phase"] == "train" and r["round"] == 2 for r in _records(metrics)):
        assert time.time() < deadline
        time.sleep(0.5)
    # back, with no state and no cached basis: round 3 waits for it (min-available-nodes=4)
    fed.start_supernode(2, cache_dir=tmp_path / "empty-cache", node_config=parties[2])
    status = fed.wait(run_id, timeout=400, until=out / "summary.json")
    assert status == "finished:completed", status
    summary = json.loads((out / "summary.json").read_text())
    train = {r["round"]: r for r in _records(metrics) if r["phase"] == "train"}
    assert train[1]["clients"] == train[1]["replies"] == 3 and train[1]["bytes_basis"] > 0
    assert train[2]["failed"] == 1 and train[2]["replies"] == 2 and train[2]["updated"]
    # the restarted node said it lacked the basis, got it again, and its reply counted in the same round
    assert train[3]["basis_resent"] == 1 and train[3]["bytes_basis"] > 0 and train[3]["replies"] == 3
    assert summary["rounds"] == 3 and summary["final_accuracy"] is not None
    evaluations = [r for r in _records(metrics) if r["phase"] == "evaluate"]
    assert evaluations and all(r["clients"] == 0 and r["examples"] == 40 for r in evaluations)  # the server's own file
    # every party's training examples: its own file less its held-out slice (the restarted node greeted twice)
    assert {(e["partition-id"], e["train_examples"]) for e in summary["node_train_examples"]} == \
        _train_examples(run_config, parties[:3])
    # the party with another model: refused with one clear error, never sampled
    (refused,) = summary["refused_nodes"]
    assert refused["partition-id"] == 3 and refused["reason"] == "model-mismatch"
    assert refused["model_path"] == parties[3]["model"]
    run_model = get_task(FedSBConfig.from_run_config(run_config)).model_id  # what the server computes
    assert refused["model_id"] != run_model
    said = (f"node {refused['node_id']} (partition-id 3) refused: its model has content id {refused['model_id']} "
            f"at {parties[3]['model']} on that node; the run's has {run_model}")
    server_log = fed.flwr("log", str(run_id), "fedsb-test", "--show").stdout  # the ServerApp's own output
    assert said in refused["detail"] and server_log.count(said) == 1, server_log[-3000:]
    assert intruder.wait(timeout=60) != 0  # refused: the SuperLink answers 412 to an unregistered key
    assert "Failed to activate SuperNode" in fed.log("supernode-4")
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in fed.log("superlink")
    assert all(r["clients"] <= 3 for r in train.values())  # neither the intruder nor the refused party joined a round


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
        run_id = fed.start_run(tiny_run_config(tiny_bert, sentiment_csv, out, **{
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
        first = fed.start_run(cfg)
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
        second = fed.start_run(dict(cfg, resume=True))
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
