"""Devices and half precision (issue 20): the keys are validated, a bfloat16 base trains float32 R and head
and uploads float32, and its PEFT export loads into a float32 base."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedsb import adapters
from fedsb.config import ConfigError, FedSBConfig
from fedsb.methods import FedSB
from fedsb.tasks.models import load_base_model
from tests.conftest import tiny_run_config


def test_device_and_dtype_keys_are_validated():
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError) as e:
            FedSBConfig.from_run_config({"device": "cuda"})
        assert e.value.key == "device" and "device='auto' or 'cpu'" in str(e.value)
        assert FedSBConfig.from_run_config({"device": "auto"}).torch_device == "cpu"
    with pytest.raises(ConfigError) as e:
        FedSBConfig.from_run_config({"base-dtype": "float8"})
    assert e.value.key == "base-dtype" and "bfloat16" in str(e.value)
    assert "device" not in FedSBConfig.identity_keys() and "base-dtype" in FedSBConfig.identity_keys()


def test_bfloat16_base_keeps_adapters_and_head_in_float32(tiny_bert):
    model = load_base_model(str(tiny_bert), "seq-cls", 3, 0, torch.bfloat16)
    layers = FedSB("fed-sb", 4, 1.0).build(model, adapters.find_targets(model, None))
    layer = next(iter(layers.values()))
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.sb_R.weight.dtype == layer.sb_B.dtype == torch.float32
    assert model.classifier.weight.dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for l in layers.values():
            l.set_basis(torch.linalg.qr(torch.randn(l.out_features, 4, generator=g))[0],
                        torch.linalg.qr(torch.randn(l.in_features, 4, generator=g))[0].t(), torch.zeros(4, 4))
    ids = torch.randint(1000, 3000, (8, 9), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(8) % 3}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(15):
        out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        assert out.dtype == torch.float32  # the head's output: float32 logits into a float32 loss
        loss = torch.nn.functional.cross_entropy(out, batch["labels"])
        opt.zero_grad()
        loss.backward()
        assert layer.sb_R.weight.grad.dtype == torch.float32
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]  # it learns (memorizes the 8 labels)
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())  # optimizer state float32
    assert FedSB("fed-sb", 4, 1.0).get_vector(model).dtype == np.float32  # what is uploaded


def test_bfloat16_base_exports_a_peft_adapter_that_loads_into_float32(tiny_bert, tmp_path):
    from peft import PeftModel

    from fedsb.run.export import export_peft

    model = load_base_model(str(tiny_bert), "seq-cls", 3, 0, torch.bfloat16)
    layers = FedSB("fed-sb", 4, 1.0).build(model, adapters.find_targets(model, None))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for l in layers.values():
            l.set_basis(torch.linalg.qr(torch.randn(l.out_features, 4, generator=g))[0],
                        torch.linalg.qr(torch.randn(l.in_features, 4, generator=g))[0].t(), torch.randn(4, 4, generator=g))
    export_peft(tmp_path / "peft", model, str(tiny_bert), "SEQ_CLS")
    base = load_base_model(str(tiny_bert), "seq-cls", 3, 0)  # float32
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    assert all(p.dtype == torch.float32 for p in peft_model.parameters())
    ids = torch.randint(1000, 3000, (3, 9), generator=g)
    with torch.no_grad():
        ours = model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        theirs = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.allclose(ours, theirs, atol=0.1), (ours - theirs).abs().max()  # bfloat16 body vs float32 body


def test_bfloat16_base_federated_run(tiny_bert, sentiment_csv, tmp_path):
    from lab.inprocess_grid import run_inprocess

    run = run_inprocess(tiny_run_config(tiny_bert, sentiment_csv, tmp_path / "bf16", **{"base-dtype": "bfloat16",
                                                                                          "num-server-rounds": 2}), 3)
    s = json.loads((run / "summary.json").read_text())
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert s["final_accuracy"] >= 0.8 and s["config"]["base-dtype"] == "bfloat16"
    assert s["bytes_up_per_client_round"] <= 1.10 * 4 * s["communicated_params"] + 1024  # float32 uploads
    assert all(r["client_peak_memory_bytes"] > 0 for r in recs if r["phase"] == "train")
    # where a client's round went, median over the replies (the deployment benchmark reads these)
    timings = [r["client_seconds"] for r in recs if r["phase"] == "train"]
    assert all(set(t) == {"process-age", "setup", "model", "data", "seconds"} and t["seconds"] > 0 for t in timings)
