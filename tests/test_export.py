"""The exports: fedsb's own format reloads exactly, and PEFT loads the LoRA export with the same logits."""

from __future__ import annotations

import torch

from fedsb import adapters
from fedsb.run.export import export_merged, export_peft, load_fedsb_adapter, save_fedsb_adapter
from fedsb.methods import FedSB
from fedsb.tasks.models import load_base_model


def _trained_sb_model(tiny_bert, seed=0):
    model = load_base_model(str(tiny_bert), "seq-cls", 3, 0)
    names = adapters.find_targets(model, None)
    layers = FedSB("fed-sb", 4, 0.5).build(model, names)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for l in layers.values():
            B, _ = torch.linalg.qr(torch.randn(l.out_features, 4, generator=g))
            A, _ = torch.linalg.qr(torch.randn(l.in_features, 4, generator=g))
            l.set_basis(B, A.t(), torch.randn(4, 4, generator=g))
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
