"""FedEx-LoRA: FedIT plus the residual ``mean(B_i·A_i) − mean(B)·mean(A)`` folded into the frozen W0 (exact)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedsb import adapters
from fedsb.methods.lora import FedIT
from fedsb.wire import flatten, split, unflatten_into


@dataclass
class FedExLoRA(FedIT):
    """FedIT plus the residual mean(B_i·A_i) − mean(B)·mean(A) folded into the frozen W0 (exact).

    The server keeps the cumulative residual per layer; clients receive it every round (m·n numbers
    per layer, counted in the download bytes) and add it to their frozen base weights.
    """

    residual: dict[str, torch.Tensor] = field(default_factory=dict)
    streamable = False  # the residual needs every client's own A_i, B_i
    supports_secagg = False  # ... which secure aggregation hides
    modifies_base = True  # the residual is folded into W0

    def aggregate(self, model, vectors, weights, combine):
        layers = adapters.adapter_layers(model)
        trainable = self.trainable(model)
        w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        # mean of the products, per layer, from each client's own A_i, B_i
        prod_mean = {n: torch.zeros(l.out_features, l.in_features, dtype=torch.float64) for n, l in layers.items()}
        for vec, wi in zip(vectors, w):
            parts = split(trainable, vec)
            for n in layers:
                prod_mean[n] += wi * (parts[n + ".lora_B.weight"].double() @ parts[n + ".lora_A.weight"].double())
        new = combine(vectors, weights)
        parts = split(trainable, new)
        for n, layer in layers.items():
            res = self.scale * (prod_mean[n] - parts[n + ".lora_B.weight"].double() @ parts[n + ".lora_A.weight"].double())
            self.residual[n] = self.residual.get(n, torch.zeros_like(res)) + res
        apply_weight_delta(model, {n: r for n, r in self.residual.items()}, replace_from=self._base_copy(model))
        return new

    def _base_copy(self, model):
        # The original W0 of each layer, kept once so the cumulative residual is applied exactly.
        if not hasattr(self, "_w0"):
            self._w0 = {n: adapters.weight_as_mn(l.base_layer).detach().clone() for n, l in adapters.adapter_layers(model).items()}
        return self._w0

    def extra_download(self, node: int) -> dict[str, np.ndarray]:
        return {"residual": flatten(self.residual)} if self.residual else {}

    def apply_extra(self, model, extra):
        if "residual" in extra:
            layers = adapters.adapter_layers(model)
            shapes = {n: torch.zeros(l.out_features, l.in_features) for n, l in layers.items()}
            unflatten_into(shapes, extra["residual"])
            apply_weight_delta(model, shapes)

    def server_state(self):
        return {"residual." + n: r for n, r in self.residual.items()}

    def load_server_state(self, model, state):
        self._base_copy(model)
        self.residual = {k[len("residual."):]: v.double() for k, v in state.items() if k.startswith("residual.")}
        if self.residual:
            apply_weight_delta(model, self.residual, replace_from=self._w0)


@torch.no_grad()
def apply_weight_delta(model: nn.Module, deltas: dict[str, torch.Tensor], replace_from: dict[str, torch.Tensor] | None = None) -> None:
    """W0 ← (original W0 if given, else current W0) + delta, per adapted layer (m×n deltas)."""
    layers = adapters.adapter_layers(model)
    for n, d in deltas.items():
        base = layers[n].base_layer
        w = adapters.weight_as_mn(base)
        start = replace_from[n] if replace_from is not None else w
        w.copy_((start.double() + d.to(start.device).double()).to(w.dtype))
