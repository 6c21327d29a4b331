"""A node whose model is not the run's (one weight differs) is refused when it first answers: the server logs
one error naming it, its model and the run's, never samples it again, lists it in summary.json, and the run
completes with the other nodes. A node whose hello fails (a transient fault) stays eligible. Over the
in-process grid, each node with its own file (``dataset='none'``)."""

from __future__ import annotations

import json
import logging
from collections import defaultdict

from client.handlers import FedSBClient
from client.node import NodeSettings
from fedsb.config import FedSBConfig
from fedsb.tasks import get_task
from lab.tiny import copy_with_changed_weight, make_sentiment_csv
from tests.conftest import tiny_run_config


def _recording(monkeypatch) -> dict:
    """Every message each node handled, by partition id: [(kind, round or mode)]."""
    seen = defaultdict(list)

    def wrap(kind, handler):
        def run(self, msg, context):
            c = msg.content["config"]
            seen[int(context.node_config["partition-id"])].append((kind, c.get("mode", c.get("round"))))
            return handler(self, msg, context)
        return run

    for kind in ("query", "train", "evaluate"):
        monkeypatch.setattr(FedSBClient, kind, wrap(kind, getattr(FedSBClient, kind)))
    return seen


def test_a_node_with_another_model_is_refused_and_the_run_goes_on_without_it(tiny_bert, tmp_path, monkeypatch, caplog):
    from lab.inprocess_grid import run_inprocess

    seen = _recording(monkeypatch)
    changed = copy_with_changed_weight(tiny_bert, tmp_path / "changed-model")
    nodes = [{"dataset": str(make_sentiment_csv(tmp_path / f"party{i}.csv", n=40 + 10 * i, seed=20 + i))} for i in range(4)]
    nodes[3]["model"] = str(changed)
    rc = tiny_run_config(tiny_bert, tmp_path / "unused.csv", tmp_path / "run", **{
        "dataset": "none", "labels": "neg,pos", "num-server-rounds": 2, "local-steps": 3, "fraction-train": 1.0,
        "min-train-nodes": 2})
    with caplog.at_level(logging.ERROR, logger="fedsb.server"):
        run_dir = run_inprocess(rc, 4, node_configs=nodes)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())

    # the ids the server and that node compute (the node's own code path: its node config over the run's)
    cfg = FedSBConfig.from_run_config(rc)
    expected = get_task(cfg).model_id
    theirs = get_task(NodeSettings.from_node_config({**nodes[3], "partition-id": 3}).task_config(cfg))
    assert theirs.model_id != expected

    (refused,) = summary["refused_nodes"]
    assert refused["partition-id"] == 3 and refused["reason"] == "model-mismatch"
    assert refused["model_id"] == theirs.model_id and refused["model_path"] == str(theirs.model_path)
    errors = [r.getMessage() for r in caplog.records if r.name == "fedsb.server" and r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert all(s in errors[0] for s in (f"node {refused['node_id']} ", theirs.model_id, expected, str(theirs.model_path)))
    # it was greeted, and never asked anything after: no init gradient, no training, no evaluation
    assert seen[3] == [("query", "hello")]
    train = [r for r in records if r["phase"] == "train"]
    assert [r["round"] for r in train] == [1, 2]
    assert all(r["clients"] == 3 and r["replies"] == 3 and r["failed"] == 0 and r["updated"] for r in train)
    for pid in range(3):
        assert [rnd for kind, rnd in seen[pid] if kind == "train"] == [1, 2]
    assert [e["partition-id"] for e in summary["node_train_examples"]] == [0, 1, 2]
    assert summary["final_accuracy"] is not None


def test_a_node_whose_hello_fails_stays_eligible(tiny_bert, tmp_path, monkeypatch):
    """A transient fault is no refusal: the node trains in later rounds, and summary.json refuses nobody."""
    from lab.inprocess_grid import run_inprocess

    seen, real_query, failed = _recording(monkeypatch), FedSBClient.query, []

    def flaky(self, msg, context):
        if context.node_config["partition-id"] == 2 and not failed:
            failed.append(1)
            raise ConnectionError("the node's disk was busy")
        return real_query(self, msg, context)

    monkeypatch.setattr(FedSBClient, "query", flaky)
    rc = tiny_run_config(tiny_bert, make_sentiment_csv(tmp_path / "data.csv", n=120), tmp_path / "run", **{
        "num-server-rounds": 1, "local-steps": 2, "fraction-train": 1.0, "min-train-nodes": 2, "init-basis": "random"})
    summary = json.loads((run_inprocess(rc, 3) / "summary.json").read_text())
    assert failed and summary["refused_nodes"] == []
    assert [rnd for kind, rnd in seen[2] if kind == "train"] == [1]
