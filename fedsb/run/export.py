"""Adapter export: fedsb's own safetensors format, a PEFT LoRA adapter, and a merged HF model.

PEFT export of a Fed-SB adapter: ``lora_A = A`` (r×n) and ``lora_B = s·B·R`` (m×r) with
``lora_alpha = r``, so PEFT's scale α/r is 1 and ``lora_B·lora_A = s·B·R·A`` exactly. The task head
goes into ``modules_to_save``. Any PEFT user can then load the result without fedsb.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedsb import adapters
from fedsb.adapters import Conv1D, LoRALinear, SBLinear

log = logging.getLogger(__name__)

FEDSB_WEIGHTS = "fedsb_adapter.safetensors"
FEDSB_CONFIG = "fedsb_adapter.json"


def head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    heads = adapters.head_prefixes(model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if any(n.startswith(h + ".") for h in heads)}


def save_fedsb_adapter(out_dir: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write every adapter tensor (B, A, R or lora_A, lora_B) and the head, plus a JSON description."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in adapters.adapter_layers(model).items():
        if isinstance(layer, SBLinear):
            tensors[f"{name}.sb_B"] = layer.sb_B
            tensors[f"{name}.sb_A"] = layer.sb_A
            tensors[f"{name}.sb_R"] = layer.sb_R.weight
        else:
            tensors[f"{name}.lora_A"] = layer.lora_A.weight
            tensors[f"{name}.lora_B"] = layer.lora_B.weight
    tensors.update({f"head.{n}": t for n, t in head_state(model).items()})
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / FEDSB_WEIGHTS))
    meta = dict(meta, layers=list(adapters.adapter_layers(model)), heads=adapters.head_prefixes(model))
    (out / FEDSB_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


@torch.no_grad()
def load_fedsb_adapter(adapter_dir: str | Path, base_model: nn.Module) -> nn.Module:
    """Inject SB layers into ``base_model`` (in place) and load a saved Fed-SB adapter into them."""
    d = Path(adapter_dir)
    meta = json.loads((d / FEDSB_CONFIG).read_text())
    tensors = load_file(str(d / FEDSB_WEIGHTS))
    if meta.get("method", "fed-sb") != "fed-sb":
        raise ValueError(f"{d} holds a {meta['method']!r} adapter; load_fedsb_adapter reads fed-sb adapters")
    layers = adapters.inject_sb(base_model, meta["layers"], int(meta["rank"]), float(meta["scale"]))
    for name, layer in layers.items():
        layer.set_basis(tensors[f"{name}.sb_B"], tensors[f"{name}.sb_A"], tensors[f"{name}.sb_R"])
    params = dict(base_model.named_parameters())
    for key, t in tensors.items():
        if key.startswith("head."):
            params[key[len("head."):]].copy_(t)
    return base_model


def export_peft(out_dir: str | Path, model: nn.Module, base_model_path: str, task_type: str) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft`` loads as LoRA."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = adapters.adapter_layers(model)
    if not layers:
        raise ValueError("the model has no adapter layers to export")
    tensors: dict[str, torch.Tensor] = {}
    ranks = set()
    fan_in_fan_out = False
    for name, layer in layers.items():
        if isinstance(layer, SBLinear):
            lora_A = layer.sb_A
            lora_B = layer.scale * layer.sb_B @ layer.sb_R.weight
        elif isinstance(layer, LoRALinear):
            lora_A = layer.lora_A.weight
            lora_B = layer.scale * layer.lora_B.weight  # fold α/r into B: PEFT's scale is then 1
        else:  # pragma: no cover
            raise TypeError(type(layer))
        fan_in_fan_out |= bool(Conv1D) and isinstance(layer.base_layer, Conv1D)
        ranks.add(lora_A.shape[0])
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_A.detach().float().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_B.detach().float().contiguous()
    heads = adapters.head_prefixes(model)
    for n, t in head_state(model).items():
        tensors[f"base_model.model.{n}"] = t.float().contiguous()
    if len(ranks) != 1:
        raise ValueError(f"layers have different ranks {sorted(ranks)}; PEFT export needs one rank")
    r = ranks.pop()
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_path,
        "r": r,
        "lora_alpha": r,  # scale alpha/r = 1: the scale already sits in lora_B
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": sorted(layers),
        "modules_to_save": heads or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
    }
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if task_type == "SEQ_CLS" and hasattr(model, "config"):
        # the head's config (num_labels, id2label, label2id) where transformers reads it:
        # AutoModelForSequenceClassification.from_pretrained(base, config=AutoConfig.from_pretrained(<this folder>))
        model.config.save_pretrained(out)
    return out


def export_merged(out_dir: str | Path, model: nn.Module, tokenizer=None) -> Path:
    """Merge the adapters into the weights and save a plain transformers model folder."""
    import copy

    merged = adapters.unwrap(copy.deepcopy(model))
    merged.save_pretrained(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return Path(out_dir)
