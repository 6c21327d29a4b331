"""The exports: fedsb's own format reloads exactly, and PEFT loads the LoRA export with the same logits."""

from __future__ import annotations

import pytest
import torch

from fedsb import adapters
from fedsb.run.export import export_merged, export_peft, load_fedsb_adapter, save_fedsb_adapter
from fedsb.methods import FedSB, method_for
from fedsb.tasks.models import load_base_model
from lab.tiny import set_random_bases


def _trained_sb_model(tiny_bert, seed=0):
    model = load_base_model(str(tiny_bert), "seq-cls", 3, 0)
    names = adapters.find_targets(model, None)
    layers = FedSB("fed-sb", 4, 0.5).build(model, names)
    g = set_random_bases(layers, 4, seed)
    with torch.no_grad():
        model.classifier.weight.add_(torch.randn(model.classifier.weight.shape, generator=g))
    return model.eval()


def _batch():
    ids = torch.randint(1000, 3000, (3, 9), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_fedsb_format_round_trip(tiny_bert, tmp_path):
    model = _trained_sb_model(tiny_bert)
    save_fedsb_adapter(tmp_path / "a", model, {"method": "fed-sb", "rank": 4, "scale": 0.5})
    again = load_fedsb_adapter(tmp_path / "a", load_base_model(str(tiny_bert), "seq-cls", 3, 0)).eval()
    with torch.no_grad():
        assert torch.equal(model(**_batch()).logits, again(**_batch()).logits)


def test_peft_loads_export_with_same_logits(tiny_bert, tmp_path):
    from peft import PeftModel

    model = _trained_sb_model(tiny_bert)
    export_peft(tmp_path / "peft", model, str(tiny_bert), "SEQ_CLS")
    base = load_base_model(str(tiny_bert), "seq-cls", 3, 0)
    with torch.no_grad():
        plain = base(**_batch()).logits
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        ours, theirs = model(**_batch()).logits, peft_model(**_batch()).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert not torch.allclose(plain, theirs, atol=1e-3)  # the adapter (and head) really changed something


def test_merged_export_equals_adapter_model(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = _trained_sb_model(tiny_bert)
    export_merged(tmp_path / "merged", model)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(model(**_batch()).logits, merged(**_batch()).logits, atol=1e-5)
    assert adapters.adapter_layers(model)  # the original stays adapted and unmerged
    assert not any(l.merged for l in adapters.adapter_layers(model).values())


# -- every method's run export reproduces the server's final model ------------------------------------
METHODS = ("fed-sb", "fedit", "ffa-lora", "fedex-lora", "flora")


def _server_final_model(task, rounds=2, clients=3):
    """A server's final state without Flower: each round the clients train copies of the global model on
    their partitions, and the server aggregates, sets the vector and runs ``after_round`` in the order
    ``server.strategy.FedSB.aggregate_train`` does (FLoRA folds its stacks and FedEx-LoRA its residual into W0 here)."""
    import copy

    from fedsb.adapters import sb_init
    from fedsb.aggregation import robust
    from fedsb.tasks.training import train_steps

    method, model = method_for(task.cfg), task.base_model()
    layers = method.build(model, task.layer_names)
    if method.needs_basis:  # Fed-SB: a seeded basis (the basis protocol is the server's, not under test here)
        sb_init.apply_bases(layers, sb_init.random_bases({n: (l.out_features, l.in_features) for n, l in layers.items()},
                                                         method.rank, 0))
    for rnd in range(1, rounds + 1):
        global_vec, vectors, weights = method.get_vector(model), [], []
        for c in range(clients):
            local = copy.deepcopy(model)
            method.set_vector(local, global_vec)
            ds = task.data.client_dataset(c, clients, task.cfg)
            train_steps(local, task.loader(ds, shuffle=True, seed=rnd, batch_size=8), 4, 0.05, task.loss_fn, progress=False)
            vectors.append(method.get_vector(local))
            weights.append(float(len(ds)))
        method.set_vector(model, method.aggregate(model, vectors, weights, robust.weighted_mean))
        method.after_round(model, rnd)
    return method, model


@pytest.mark.parametrize("name", METHODS)
def test_run_export_loads_in_plain_peft_with_the_servers_accuracy(tiny_bert, sentiment_csv, tmp_path, name):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedsb.config import FedSBConfig
    from fedsb.run.export import export_run
    from fedsb.tasks import get_task
    from fedsb.tasks.training import model_inputs
    from tests.conftest import tiny_run_config

    task = get_task(FedSBConfig.from_run_config(tiny_run_config(tiny_bert, sentiment_csv, tmp_path, method=name)))
    method, model = _server_final_model(task)
    loader = task.loader(task.data.test_dataset(task.cfg.eval_max_samples), shuffle=False, batch_size=64)
    server = task.server_evaluate(model, loader)  # what FedSB.evaluate logs as the final accuracy
    export_run(tmp_path / "adapter", model, method, task, {"method": name})

    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=task.data.num_labels)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter" / "peft")).eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            ours, theirs = model(**model_inputs(batch)).logits, peft_model(**model_inputs(batch)).logits
            assert torch.allclose(ours, theirs, atol=1e-4), (name, (ours - theirs).abs().max())
            correct += int((theirs.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    assert total == server["num-examples"] and correct / total == server["accuracy"], (name, correct, total, server)
