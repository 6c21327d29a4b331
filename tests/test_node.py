"""A node's own settings (``--node-config``): its data file and label set, its model and the content
fingerprint, its threads, its privacy bounds. The client handlers run in process on a hand-built message."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.dp import DPTrainer, delta
from client.handlers import FedSBClient
from client.node import NodeConfigError, NodeSettings
from fedsb.adapters.sb_init import apply_bases, random_bases
from fedsb.config import ConfigError, FedSBConfig
from fedsb.methods import method_for
from fedsb.tasks import get_task
from fedsb.wire import MESSAGE_CONFIG_DEFAULTS, basis_tensors, flatten, layers_fingerprint
from lab.tiny import copy_with_changed_weight
from tests.conftest import tiny_run_config


@pytest.fixture(autouse=True)
def _node_process(tmp_path, monkeypatch):
    """What a SuperNode's app process has: its own basis cache, and Flower's task identity (messages built
    here, as the server's would be, need a run id)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setenv("FEDSB_CACHE_DIR", str(tmp_path / "cache"))
    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 7)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _run_config(tiny_bert, csv_path, tmp_path, **extra) -> dict:
    rc = tiny_run_config(tiny_bert, csv_path, tmp_path / "run", **{"local-steps": 2, **extra})
    rc.pop("output-dir")
    return rc


def _write_rows(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["review", "stars"])
        w.writerows(rows)
    return path


def _context(run_config: dict, node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)


def _train_message(task, rnd: int = 1) -> Message:
    """What the server sends a node in round ``rnd``: a random basis over the server's own ``task`` model,
    its fingerprint, the global vector."""
    model, method = task.base_model(), method_for(task.cfg)
    layers = method.build(model, task.layer_names)
    bases = random_bases({n: (l.out_features, l.in_features) for n, l in layers.items()}, method.rank, 3)
    apply_bases(layers, bases)
    config = {**MESSAGE_CONFIG_DEFAULTS, "round": rnd, "fingerprint": layers_fingerprint(task.model_id, method.rank, layers)}
    content = RecordDict({"adapter": ArrayRecord({"adapter": Array(method.get_vector(model))}),
                          "config": ConfigRecord(config),
                          "basis": ArrayRecord({"basis": Array(flatten(basis_tensors(layers)))})})
    return Message(content, dst_node_id=7, message_type="train")


# -- 4. the content fingerprint ------------------------------------------------------------------
def test_fingerprint_ignores_the_path_and_catches_a_changed_weight(tiny_bert, sentiment_csv, tmp_path):
    rc = _run_config(tiny_bert, sentiment_csv, tmp_path)
    server = get_task(FedSBConfig.from_run_config(rc))
    moved = get_task(FedSBConfig.from_run_config(dict(rc, model=str(shutil.copytree(tiny_bert, tmp_path / "elsewhere")))))
    changed = get_task(FedSBConfig.from_run_config(dict(rc, model=str(copy_with_changed_weight(tiny_bert, tmp_path / "changed",
                                                                                      server.layer_names[0])))))
    assert moved.model_path != server.model_path and moved.model_id == server.model_id
    assert changed.model_id != server.model_id
    msg = _train_message(server)
    # the same model at another path trains and echoes the server's fingerprint
    reply = FedSBClient().train(msg, _context(rc, {"model": moved.model_path}))
    assert reply.content["config"]["status"] == "ok"
    assert reply.content["config"]["fingerprint"] == msg.content["config"]["fingerprint"]
    # a model with one different weight is refused, and the error names that model
    with pytest.raises(RuntimeError, match=f"model {changed.model_path} .*is not the server's"):
        FedSBClient().train(_train_message(server), _context(rc, {"model": changed.model_path}))


# -- 5. threads ----------------------------------------------------------------------------------
def test_threads_come_from_the_node(monkeypatch):
    for var in ("FEDSB_CLIENT_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    assert NodeSettings().threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # what Ray sets in a simulated client: its client-resources-num-cpus
    assert NodeSettings().threads() == 2
    assert NodeSettings.from_node_config({"num-threads": 3}).threads() == 3
    with pytest.raises(NodeConfigError, match="node-config 'num-threads'"):
        NodeSettings.from_node_config({"num-threads": "many"})


def test_each_message_sets_the_node_thread_count(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("FEDSB_CLIENT_THREADS", raising=False)
        client = FedSBClient(task_for=lambda cfg: None)
        client.setup(_context({}, {"num-threads": 3}))
        assert torch.get_num_threads() == 3
        monkeypatch.setenv("FEDSB_CLIENT_THREADS", "2")
        client.setup(_context({}, {}))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# -- 6. a node's privacy -------------------------------------------------------------------------
class _Store:
    def __init__(self):
        self.d = {}

    def get(self, key):
        return self.d.get(key)

    def put(self, key, arrays, meta=None):
        self.d[key] = (arrays, meta or {})


def test_delta_above_the_node_bound_is_clamped():
    cfg = FedSBConfig.from_run_config({"dp": True})
    assert delta(cfg, {"dp-delta": 0.5}, 200, NodeSettings()) == pytest.approx(1 / 2000)  # the server asks 0.5
    assert delta(cfg, {"dp-delta": 0.5}, 200, NodeSettings(dp_delta=1e-6)) == 1e-6
    assert delta(cfg, {"dp-delta": 1e-7}, 200, NodeSettings()) == 1e-7  # a stricter server's δ is kept
    loose = FedSBConfig.from_run_config({"dp": True, "target-delta": 0.5})
    assert delta(loose, {}, 200, NodeSettings()) == pytest.approx(1 / 2000)


def test_round_past_the_node_max_epsilon_is_refused_and_reported():
    cfg = FedSBConfig.from_run_config({"dp": True, "target-epsilon": 8.0, "num-server-rounds": 3, "local-steps": 5})
    ds = list(range(200))  # only its size is read before the budget check
    config = {"dp-delta": 0.0, "dp-history": []}
    loss, metrics = DPTrainer(cfg, NodeSettings(max_epsilon=0.01)).train(None, None, ds, 0, 1, config, _Store())
    assert loss is None and "max-epsilon 0.01" in metrics["refused"] and metrics["epsilon"] == 0.0


def test_refused_round_reply_says_why(tiny_bert, sentiment_csv, tmp_path):
    rc = _run_config(tiny_bert, sentiment_csv, tmp_path, **{"dp": True, "method": "fed-sb"})
    server = get_task(FedSBConfig.from_run_config(rc))
    reply = FedSBClient().train(_train_message(server), _context(rc, {"max-epsilon": 0.01}))
    assert reply.content["config"]["status"] == "budget-exhausted"
    assert "this node's max-epsilon 0.01" in reply.content["config"]["reason"]


# -- 1, 2. a node's own data and the one label set ------------------------------------------------
def test_node_trains_on_its_own_file(tiny_bert, sentiment_csv, tmp_path):
    rows = [(f"good great {i}", "pos") for i in range(30)] + [(f"bad awful {i}", "neg") for i in range(10)]
    own = _write_rows(tmp_path / "local.csv", rows)
    rc = _run_config(tiny_bert, sentiment_csv, tmp_path, labels="neg,pos")
    node = {"dataset": str(own), "text-column": "review", "label-column": "stars", "partition-id": 1, "num-partitions": 4}
    client = FedSBClient()
    cfg, task, settings = client.setup(_context(rc, node))
    train, held_out = client.train_dataset(task, cfg, settings), client.eval_dataset(task, cfg, settings)
    assert len(train) + len(held_out) == 40 and len(held_out) == round(40 * cfg.test_fraction)
    assert not set(train.indices) & set(held_out.indices)  # federated evaluation reads no training example
    assert task.data.label_names == ["neg", "pos"] and int(train.labels.sum()) == 30  # 30 "pos", ids from `labels`
    reply = FedSBClient().train(_train_message(get_task(FedSBConfig.from_run_config(rc))), _context(rc, node))
    assert reply.content["metrics"]["num-examples"] == len(train)


def test_node_with_a_label_outside_the_set_refuses_before_training(tiny_bert, sentiment_csv, tmp_path):
    own = _write_rows(tmp_path / "odd.csv", [("fine", "pos"), ("meh", "neutral"), ("bad", "neg")])
    rc = _run_config(tiny_bert, sentiment_csv, tmp_path, labels="neg,pos")
    node = {"dataset": str(own), "text-column": "review", "label-column": "stars"}
    hello = Message(RecordDict({"config": ConfigRecord({"mode": "hello"})}), dst_node_id=7, message_type="query")
    with pytest.raises(ConfigError, match=r"run-config 'labels': .*odd\.csv.*'neutral'"):
        FedSBClient().query(hello, _context(rc, node))
    with pytest.raises(ConfigError, match="run config's labels"):  # no label set: nothing to map the file onto
        FedSBClient().setup(_context(_run_config(tiny_bert, sentiment_csv, tmp_path), node))


def test_label_set_fixes_the_head_order(tmp_path):
    from fedsb.tasks.data import load_table

    f = _write_rows(tmp_path / "t.csv", [("a", "positive"), ("b", "negative")])
    assert load_table(str(f), "review", "stars").label_names == ["negative", "positive"]
    t = load_table(str(f), "review", "stars", labels=("positive", "neutral", "negative"))
    assert t.label_names == ["positive", "neutral", "negative"] and t.labels.tolist() == [0, 2]
    with pytest.raises(ConfigError, match="labels"):
        FedSBConfig.from_run_config({"labels": "a,a"})
