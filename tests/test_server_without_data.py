"""A server without client data (``dataset='none'``): every node trains on its own file, the server reads
none; evaluation is federated (nodes that did not train, on their held-out slices, example-weighted) or on
the server's own ``eval-dataset``. Runs over the in-process grid, each node its own CSV file."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from client.handlers import FedSBClient
from client.node import NodeConfigError, NodeSettings
from fedsb.config import ConfigError, FedSBConfig
from fedsb.preflight import check_data
from lab.tiny import make_sentiment_csv
from server.nodes import Nodes, sample_nodes
from tests.conftest import tiny_run_config

SIZES = (40, 60, 80, 100)  # each node's file: a different size and seed


@pytest.fixture
def recorded(monkeypatch):
    """What each node did: (round, node id) of every train and evaluate message, the examples (indices into
    the node's own file) each read to train and to evaluate, and each evaluation's metrics."""
    seen = {"train": [], "evaluate": [], "metrics": [], "examples": defaultdict(lambda: defaultdict(set))}

    def wrap(kind, handler):
        def run(self, msg, context):
            seen[kind].append((int(msg.content["config"]["round"]), context.node_id))
            reply = handler(self, msg, context)
            if kind == "evaluate" and reply.content.config_records.get("config", {}).get("status") == "ok":
                m = reply.content["metrics"]
                seen["metrics"].append((int(msg.content["config"]["round"]), m["accuracy"], m["loss"], m["num-examples"]))
            return reply
        return run

    def dataset_of(kind, pick):
        def read(task, cfg, node):
            ds = pick(task, cfg, node)
            seen["examples"][node.dataset][kind].update(int(i) for i in ds.indices)
            return ds
        return staticmethod(read)

    monkeypatch.setattr(FedSBClient, "train", wrap("train", FedSBClient.train))
    monkeypatch.setattr(FedSBClient, "evaluate", wrap("evaluate", FedSBClient.evaluate))
    monkeypatch.setattr(FedSBClient, "train_dataset", dataset_of("train", FedSBClient.train_dataset))
    monkeypatch.setattr(FedSBClient, "eval_dataset", dataset_of("evaluate", FedSBClient.eval_dataset))
    return seen


def _nodes(tmp_path) -> list[dict]:
    return [{"dataset": str(make_sentiment_csv(tmp_path / f"party{i}.csv", n=n, seed=10 + i))} for i, n in enumerate(SIZES)]


def _config(tiny_bert, tmp_path, **extra) -> dict:
    rc = tiny_run_config(tiny_bert, tmp_path / "unused.csv", tmp_path / "run", **{
        "dataset": "none", "labels": "neg,pos", "num-server-rounds": 2, "local-steps": 5, "fraction-train": 0.5,
        "min-train-nodes": 2, **extra})
    return rc


def _records(run_dir) -> tuple[list[dict], dict]:
    return ([json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()],
            json.loads((run_dir / "summary.json").read_text()))


def test_dataset_none_evaluates_federated_on_nodes_that_did_not_train(tiny_bert, tmp_path, recorded):
    from lab.inprocess_grid import run_inprocess

    records, summary = _records(run_inprocess(_config(tiny_bert, tmp_path), len(SIZES), node_configs=_nodes(tmp_path)))
    evaluations = [r for r in records if r["phase"] == "evaluate"]
    assert [r["round"] for r in evaluations] == [0, 1, 2]
    assert not [r for r in records if r["phase"] == "federated-evaluate"]  # one evaluation: the federated one
    # the evaluate row is the example-weighted mean of the nodes' replies, and final_accuracy is the last one
    for row in evaluations:
        replies = [(acc, loss, n) for rnd, acc, loss, n in recorded["metrics"] if rnd == row["round"]]
        total = sum(n for *_, n in replies)
        assert row["clients"] == len(replies) == 2 and row["examples"] == total > 0
        assert row["accuracy"] == pytest.approx(sum(a * n for a, _, n in replies) / total)
        assert row["loss"] == pytest.approx(sum(l * n for _, l, n in replies) / total)
    assert summary["final_accuracy"] == evaluations[-1]["accuracy"] is not None
    assert summary["initial_accuracy"] == evaluations[0]["accuracy"] and summary["majority_rate"] is None
    # 4 nodes, 2 train a round: the 2 that evaluate it are the other two
    for rnd in (1, 2):
        trained = {n for r, n in recorded["train"] if r == rnd}
        evaluated = {n for r, n in recorded["evaluate"] if r == rnd}
        assert len(trained) == 2 and len(evaluated) == 2 and not trained & evaluated
    # no node ever evaluates on an example it trains on (or sends for the init gradient)
    for path, kinds in recorded["examples"].items():
        assert kinds["train"] and not kinds["train"] & kinds["evaluate"], path
    # summary.json lists every node's training examples: its own file less its held-out slice
    counts = sorted(e["train_examples"] for e in summary["node_train_examples"])
    assert len(counts) == len(SIZES) and counts == sorted(len(k["train"]) for k in recorded["examples"].values())
    assert all(0 < c < size for c, size in zip(counts, sorted(SIZES)))


def test_eval_dataset_is_what_the_server_evaluates(tiny_bert, tmp_path, recorded):
    from lab.inprocess_grid import run_inprocess

    own = make_sentiment_csv(tmp_path / "server-eval.csv", n=50, seed=99)
    init = make_sentiment_csv(tmp_path / "server-init.csv", n=30, seed=98)
    rc = _config(tiny_bert, tmp_path, **{"eval-dataset": str(own), "init-source": "server", "init-dataset": str(init)})
    records, summary = _records(run_inprocess(rc, len(SIZES), node_configs=_nodes(tmp_path)))
    evaluations = [r for r in records if r["phase"] == "evaluate"]
    assert [r["round"] for r in evaluations] == [0, 1, 2]
    assert all(r["clients"] == 0 and r["examples"] == 50 for r in evaluations)  # the whole file, on the server
    assert not recorded["evaluate"]  # no node was asked to evaluate
    assert summary["final_accuracy"] == evaluations[-1]["accuracy"] is not None and summary["majority_rate"] is not None
    init_row = next(r for r in records if r["phase"] == "init")
    assert init_row["init_source"] == "server" and init_row["clients"] == 0 and init_row["examples"] == 30


def test_dataset_none_without_labels_is_refused_naming_both_keys():
    with pytest.raises(ConfigError, match=r"run-config 'labels': dataset='none' needs labels"):
        FedSBConfig.from_run_config({"dataset": "none"})
    with pytest.raises(ConfigError, match=r"run-config 'init-source': .*init-dataset"):
        FedSBConfig.from_run_config({"dataset": "none", "labels": "a,b", "init-source": "server"})
    with pytest.raises(ConfigError, match=r"run-config 'eval-dataset': .*dataset='none'"):
        FedSBConfig.from_run_config({"eval-dataset": "x.csv"})
    with pytest.raises(ConfigError, match=r"run-config 'eval-dataset': dp=true"):  # federated only: outside DP
        FedSBConfig.from_run_config({"dataset": "none", "labels": "a,b", "dp": True})
    with pytest.raises(ConfigError, match=r"run-config 'dataset': `none` applies to task='seq-cls'"):
        FedSBConfig.from_run_config({"dataset": "none", "labels": "a,b", "task": "causal-lm"})


def test_preflight_reads_only_the_server_files(tmp_path):
    cfg = FedSBConfig.from_run_config({"dataset": "none", "labels": "neg,pos", "text-column": "text",
                                       "label-column": "label"})
    check_data(cfg)  # nothing to read
    check_data(cfg.replace(eval_dataset=str(make_sentiment_csv(tmp_path / "e.csv", n=10))))
    with pytest.raises(ConfigError, match="run-config 'eval-dataset'"):
        check_data(cfg.replace(eval_dataset=str(tmp_path / "missing.csv")))


def test_a_node_without_its_own_file_refuses_a_dataless_server():
    cfg = FedSBConfig.from_run_config({"dataset": "none", "labels": "neg,pos"})
    with pytest.raises(NodeConfigError, match="node-config 'dataset': the run config says dataset='none'"):
        NodeSettings().task_config(cfg)


def test_evaluation_sample_prefers_nodes_that_did_not_train():
    cfg = FedSBConfig.from_run_config({"fraction-train": 0.3, "min-train-nodes": 2})
    nodes = Nodes(cfg, type("S", (), {"partition_of": {}})(), None)
    ids = list(range(100, 110))
    for rnd in range(1, 6):
        trained = sample_nodes(ids, 0.3, 2, cfg.seed, rnd)
        evaluated = nodes.evaluation_sample(rnd, ids, trained)
        assert len(evaluated) == len(trained) == 3 and not set(evaluated) & set(trained)
    # too few nodes left out of training: all of them, then trainers
    few = nodes.evaluation_sample(1, ids[:4], ids[:3])
    assert len(few) == 2 and ids[3] in few
    assert len(set(nodes.evaluation_sample(1, ids[:3], ids[:3])) & set(ids[:3])) == 2


def test_a_partition_node_evaluates_on_its_share_of_the_held_out_split(tiny_bert, sentiment_csv, tmp_path):
    """Simulations (partitions of the run's dataset): federated evaluation reads no training example either."""
    from flwr.app import Context, RecordDict

    rc = tiny_run_config(tiny_bert, sentiment_csv, tmp_path / "run")
    client, shares = FedSBClient(), []
    for pid in range(3):
        context = Context(run_id=1, node_id=7, node_config={"partition-id": pid, "num-partitions": 3},
                          state=RecordDict(), run_config=rc)
        cfg, task, node = client.setup(context)
        train, held_out = client.train_dataset(task, cfg, node), client.eval_dataset(task, cfg, node)
        assert len(held_out) > 0 and not set(train.indices) & set(held_out.indices)
        shares.append(set(held_out.indices))
    assert set().union(*shares) == set(task.data.test_idx) and sum(map(len, shares)) == len(task.data.test_idx)
