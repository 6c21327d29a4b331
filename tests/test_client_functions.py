"""``FedSBClient.from_functions``: a ClientApp of the user's own, on a model factory and local data of its own
(no fedsb Task subclass), trains in a federation; what it is given is checked with errors naming the fix."""

from __future__ import annotations

import csv
import json
import re

import pytest
from flwr.app import Context
from flwr.clientapp import ClientApp

from client.handlers import FedSBClient
from fedsb.config import FedSBConfig
from fedsb.tasks.models import freeze
from fedsb.tasks.own import OwnModelTask
from tests.conftest import tiny_run_config

SIZES = (90, 150, 210)  # each node's own training examples: not the run's partitioning of the CSV


def _examples(tiny_bert, sentiment_csv):
    """The CSV tokenized the way a Flower app would, as plain dicts with a ``label`` and an extra column."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_bert))
    rows = list(csv.DictReader(sentiment_csv.open()))
    enc = tok([r["text"] for r in rows], truncation=True, max_length=16)
    return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "text": r["text"],
             "label": int(r["label"] == "pos")} for i, r in enumerate(rows)]


def _model_fn(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    return lambda: AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)


def test_a_client_app_built_from_two_functions_trains_in_a_federation(tiny_bert, sentiment_csv, tmp_path):
    from lab.inprocess_grid import run_inprocess

    examples, calls = _examples(tiny_bert, sentiment_csv), {"model": 0, "data": []}
    model_fn = _model_fn(tiny_bert)

    def counted_model_fn():
        calls["model"] += 1
        return model_fn()

    def data_fn(context: Context):
        pid = int(context.node_config["partition-id"])
        calls["data"].append(pid)
        start = sum(SIZES[:pid])
        train = examples[start:start + SIZES[pid]]
        test = examples[500 + 20 * pid:520 + 20 * pid]
        return train, test, ["neg", "pos"]

    client = FedSBClient.from_functions(model_fn=counted_model_fn, data_fn=data_fn)
    app = ClientApp()
    app.query()(client.query)
    app.train()(client.train)
    app.evaluate()(client.evaluate)

    run = run_inprocess(tiny_run_config(tiny_bert, sentiment_csv, tmp_path / "run", **{
        "num-server-rounds": 2, "federated-evaluate": True}), 3, client_app=app)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("phase") == "train"]
    fed_eval = [r for r in rows if r.get("phase") == "federated-evaluate"]
    assert train and all(r["examples"] == sum(SIZES) and r["replies"] == 3 for r in train), train  # the nodes' own data
    assert fed_eval and all(r["examples"] == 3 * 20 for r in fed_eval), fed_eval  # their own test sets
    assert sorted(calls["data"]) == [0, 1, 2] and calls["model"] == 1, calls  # once per node, once per process
    s = json.loads((run / "summary.json").read_text())
    assert s["final_accuracy"] >= 0.9, s  # the server's held-out split: the nodes learned the task


def test_the_own_model_fingerprints_as_the_servers_loaded_model(tiny_bert, sentiment_csv, tmp_path):
    # the basis fingerprint names the model by content: a user's model object must agree with the folder
    cfg = FedSBConfig.from_run_config(tiny_run_config(tiny_bert, sentiment_csv, tmp_path))
    from fedsb.tasks import get_task

    examples = _examples(tiny_bert, sentiment_csv)
    task = OwnModelTask.from_model(cfg, freeze(_model_fn(tiny_bert)(), cfg.torch_base_dtype), examples[:10],
                                   examples[10:14], ["neg", "pos"])
    assert task.model_id == get_task(cfg).model_id and task.layer_names == get_task(cfg).layer_names
    train, test = task.data.dataset.subset(task.data.train_idx), task.data.dataset.subset(task.data.test_idx)
    assert (len(train), len(test)) == (10, 4)
    item = test[1]
    assert sorted(item) == ["attention_mask", "input_ids", "labels"]  # the text column dropped, label renamed
    assert item["input_ids"].tolist() == examples[11]["input_ids"] and int(item["labels"]) == examples[11]["label"]


@pytest.mark.parametrize("labels, names, says", [
    ("neg,pos", ["pos", "neg"], "run-config 'labels'"),  # not the run config's order
    ("", ["neg", "pos", "mixed"], "build it with num_labels=3"),  # a head of another size
    ("", ["neg", "pos"], "data_fn: example 3 has label 2"),  # a label outside label_names (below)
])
def test_what_does_not_fit_is_refused_naming_the_fix(tiny_bert, sentiment_csv, tmp_path, labels, names, says):
    cfg = FedSBConfig.from_run_config(tiny_run_config(tiny_bert, sentiment_csv, tmp_path, labels=labels))
    examples = _examples(tiny_bert, sentiment_csv)[:8]
    if says.startswith("data_fn"):
        examples[3] = {**examples[3], "label": 2}
    with pytest.raises(ValueError, match=re.escape(says)):
        OwnModelTask.from_model(cfg, freeze(_model_fn(tiny_bert)(), cfg.torch_base_dtype), examples, examples[:2], names)
