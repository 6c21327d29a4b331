"""Where adapters go: default target layers per architecture, injection, freezing, the trainable state."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from fedsb.adapters.layers import LoRALinear, SBLinear, _AdapterBase, is_linear


# Default target module names per architecture (PEFT-style suffix match). All projection layers of
# the transformer blocks: Fed-SB's per-layer cost is r², so adapting every block layer is cheap.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}

# Newly initialised task heads: they stay trainable and travel with R (FedAvg of the head).
HEAD_NAMES = ("classifier", "score", "pre_classifier")


class TargetError(ValueError):
    """A target module name matched nothing (or something that is not a linear layer)."""


# ----------------------------------------------------------------------------------------------
# Target discovery and injection
# ----------------------------------------------------------------------------------------------


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise TargetError(
        f"no default target modules for model_type={model_type!r}; set run-config 'target-modules' "
        f"to some of its linear layers: {', '.join(sorted(_linear_suffixes(model)))}"
    )


def head_prefixes(model: nn.Module) -> list[str]:
    """Module names that train in full and travel with the adapter: the new task head, plus any module the
    loader marked (``fedsb_extra_heads``: e.g. the [CLS] pooler with train-pooler=true)."""
    return [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)] + list(
        getattr(model, "fedsb_extra_heads", ()))


def _linear_suffixes(model: nn.Module) -> set[str]:
    """Short names of the model's linear layers (e.g. 'query', 'attention.output.dense')."""
    out = set()
    for name, module in model.named_modules():
        if is_linear(module):
            parts = name.split(".")
            out.add(".".join(p for p in parts[-3:] if not p.isdigit()))
    return out


def find_targets(model: nn.Module, targets: Iterable[str] | None = None) -> list[str]:
    """Full names of the linear layers matched by ``targets`` (suffix match on a dot boundary).

    Heads are never adapted (they train in full). Each target must match at least one layer, and
    every match must be a linear layer, otherwise a TargetError lists the model's linear layers.
    """
    targets = list(targets) if targets is not None else default_targets(model)
    heads = head_prefixes(model)
    names = []
    for t in targets:
        hits = [
            n
            for n, m in model.named_modules()
            if (n == t or n.endswith("." + t)) and not any(n == h or n.startswith(h + ".") for h in heads)
        ]
        bad = [n for n in hits if not is_linear(model.get_submodule(n))]
        if not hits or bad:
            what = "matched no module" if not hits else f"matched non-linear modules {bad[:3]}"
            raise TargetError(
                f"run-config 'target-modules': {t!r} {what}. The model's linear layers are: "
                f"{', '.join(sorted(_linear_suffixes(model)))}"
            )
        names.extend(hits)
    return sorted(set(names), key=names.index)


def inject(model: nn.Module, names: Iterable[str], make: Callable[[str, nn.Module], nn.Module]) -> None:
    """Replace each named submodule ``m`` by ``make(name, m)`` in place."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(name, getattr(parent, child)))


def freeze_for_adapters(model: nn.Module) -> list[str]:
    """Freeze everything but adapter weights and task heads; return the head module names."""
    heads = head_prefixes(model)
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(h + ".") for h in heads))
    return heads


def inject_sb(model: nn.Module, names: list[str], rank: int, scale: float = 1.0) -> dict[str, SBLinear]:
    freeze_for_adapters(model)
    inject(model, names, lambda n, m: SBLinear(m, rank, scale))
    return adapter_layers(model)


def inject_lora(model: nn.Module, names: list[str], rank: int, alpha: float, train_a: bool = True) -> dict[str, LoRALinear]:
    freeze_for_adapters(model)
    inject(model, names, lambda n, m: LoRALinear(m, rank, alpha, train_a=train_a))
    return adapter_layers(model)


def adapter_layers(model: nn.Module) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, _AdapterBase)}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name → tensor of every trainable parameter, in the model's deterministic parameter order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def merge_all(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.merge()


@torch.no_grad()
def unmerge_all(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.unmerge()


@torch.no_grad()
def unwrap(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain base layers back (a model transformers can save)."""
    for name, layer in list(adapter_layers(model).items()):
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    return model
