"""train-pooler: the [CLS] pooler trains with the head for every method alike, is counted in what is sent,
and PEFT loads it back through modules_to_save."""

from __future__ import annotations

import json

import pytest
import torch

from fedsb import adapters
from fedsb.methods import make_method
from fedsb.run.export import export_peft
from fedsb.tasks.models import load_base_model
from tests.conftest import tiny_run_config


def _assert_peft_reproduces(model, tiny_bert, peft_dir, g: torch.Generator) -> None:
    """The exported adapter, loaded by plain PEFT into a fresh base, gives the trained model's logits."""
    from peft import PeftModel

    ids = torch.randint(1000, 3000, (3, 9), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    peft_model = PeftModel.from_pretrained(load_base_model(str(tiny_bert), "seq-cls", 3, 0), str(peft_dir)).eval()
    with torch.no_grad():
        ours, theirs = model.eval()(**batch).logits, peft_model(**batch).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


@pytest.mark.parametrize("method", ["fed-sb", "fedit", "ffa-lora", "fedex-lora", "flora"])
def test_pooler_trains_and_travels_with_every_method(tiny_bert, method):
    counts = {}
    for train_pooler in (False, True):
        model = load_base_model(str(tiny_bert), "seq-cls", 3, 0, train_pooler=train_pooler)
        m = make_method(method, 4, 1.0, 8.0, 0)
        m.build(model, adapters.find_targets(model, None))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert any(n.startswith("bert.pooler.") for n in trainable) == train_pooler
        assert not any("pooler" in n for n in adapters.adapter_layers(model))  # trained in full, never adapted
        counts[train_pooler] = m.get_vector(model).size
    hidden = 32
    assert counts[True] - counts[False] == hidden * hidden + hidden  # pooler dense weight and bias, sent every round


def test_peft_loads_a_trained_pooler(tiny_bert, tmp_path):
    model = load_base_model(str(tiny_bert), "seq-cls", 3, 0, train_pooler=True)
    layers = make_method("fed-sb", 4, 0.5, 8.0, 0).build(model, adapters.find_targets(model, None))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for l in layers.values():
            l.set_basis(torch.linalg.qr(torch.randn(l.out_features, 4, generator=g))[0],
                        torch.linalg.qr(torch.randn(l.in_features, 4, generator=g))[0].t(), torch.randn(4, 4, generator=g))
        model.bert.pooler.dense.weight.add_(torch.randn(model.bert.pooler.dense.weight.shape, generator=g))
    export_peft(tmp_path / "peft", model, str(tiny_bert), "SEQ_CLS")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(cfg["modules_to_save"]) == {"classifier", "bert.pooler"}
    _assert_peft_reproduces(model, tiny_bert, tmp_path / "peft", g)


@pytest.mark.parametrize("method", ["fed-sb", "fedit"])
def test_pooler_adapted_as_one_more_target_and_peft_loads_it(tiny_bert, tmp_path, method):
    """pooler.dense in target-modules (bench/pooler.py's `adapted` variant) is adapted like a block layer
    (Fed-SB: r² more numbers sent, not the pooler's hidden²), and the PEFT export reproduces the model."""
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense", "pooler.dense"]
    sent = {}
    for tg in (None, targets):
        model = load_base_model(str(tiny_bert), "seq-cls", 3, 0)
        m = make_method(method, 4, 1.0, 8.0, 0)
        layers = m.build(model, adapters.find_targets(model, tg))
        sent[tg is None] = m.get_vector(model).size
    assert "bert.pooler.dense" in layers and "bert.pooler.dense" in adapters.adapter_layers(model)
    extra = sent[False] - sent[True]
    assert extra == (16 if method == "fed-sb" else 4 * (32 + 32))  # one r x r R, or one LoRA pair A, B
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for l in layers.values():
            if method == "fed-sb":
                l.set_basis(torch.linalg.qr(torch.randn(l.out_features, 4, generator=g))[0],
                            torch.linalg.qr(torch.randn(l.in_features, 4, generator=g))[0].t(), torch.randn(4, 4, generator=g))
            else:
                for p in l.parameters():
                    if p.requires_grad:
                        p.add_(0.1 * torch.randn(p.shape, generator=g))
    export_peft(tmp_path / "peft", model, str(tiny_bert), "SEQ_CLS")
    _assert_peft_reproduces(model, tiny_bert, tmp_path / "peft", g)


def test_train_pooler_in_a_federated_run_and_its_errors(tiny_bert, sentiment_csv, tmp_path):
    from fedsb.config import ConfigError, FedSBConfig
    from lab.inprocess_grid import run_inprocess

    run = run_inprocess(tiny_run_config(tiny_bert, sentiment_csv, tmp_path / "run", **{"train-pooler": True,
                                                                                      "num-server-rounds": 1}), 3)
    s = json.loads((run / "summary.json").read_text())
    model = load_base_model(str(tiny_bert), "seq-cls", 2, 0, train_pooler=True)
    m = make_method("fed-sb", 4, 1.0, 8.0, 0)
    m.build(model, adapters.find_targets(model, None))
    assert s["communicated_params"] == m.get_vector(model).size  # R of every layer, head and pooler
    assert s["config"]["train-pooler"] is True and s["final_accuracy"] is not None
    with pytest.raises(ConfigError, match="train-pooler"):
        FedSBConfig.from_run_config({"train-pooler": True, "task": "causal-lm"})
