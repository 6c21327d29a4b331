"""Federated fine-tuning methods, one file each; ``make_method`` picks one from the config.

| method     | trains      | aggregate                                   | per-round extra download     |
|------------|-------------|---------------------------------------------|------------------------------|
| fed-sb     | R, head     | weighted mean of R (exact)                  | —  (B, A once per node)      |
| fedit      | A, B, head  | mean A, mean B (inexact)                    | —                            |
| ffa-lora   | B, head     | mean B, A frozen from a shared seed (exact) | —                            |
| fedex-lora | A, B, head  | mean A, mean B + residual folded into W0    | cumulative residual (m·n)    |
| flora      | A, B, head  | stack all clients' (w·B, A) into W0 (exact) | stacks the node has not seen |

Every tensor that travels is flattened into ONE float32 vector per message (``fedsb.wire``), so the
wire format costs ≈ 4 bytes per number whatever the number of layers.
"""

from __future__ import annotations

from fedsb.methods.base import Download, Method, ModelSource, NodeStore
from fedsb.methods.fed_sb import FedSB
from fedsb.methods.fedex_lora import FedExLoRA, apply_weight_delta
from fedsb.methods.flora import FLoRA, fold_stacks
from fedsb.methods.lora import FedIT, FFALoRA

REGISTRY: dict[str, type[Method]] = {"fed-sb": FedSB, "fedit": FedIT, "ffa-lora": FFALoRA,
                                     "fedex-lora": FedExLoRA, "flora": FLoRA}


def method_class(name: str) -> type[Method]:
    cls = REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown method {name!r}; one of {', '.join(REGISTRY)}")
    return cls


def make_method(name: str, rank: int, scale: float, lora_alpha: float, seed: int) -> Method:
    cls = method_class(name)
    return cls(name, rank, cls.scale_for(scale, lora_alpha, rank), seed=seed)


def method_for(cfg) -> Method:
    """The run config's method (``cfg``: a ``FedSBConfig``)."""
    return make_method(cfg.method, cfg.rank, cfg.scale, cfg.lora_alpha, cfg.seed)


__all__ = ["Method", "Download", "ModelSource", "NodeStore", "method_class", "method_for", "FedSB", "FedIT", "FFALoRA", "FedExLoRA", "FLoRA", "REGISTRY",
           "make_method", "apply_weight_delta", "fold_stacks"]
