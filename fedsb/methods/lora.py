"""The LoRA baselines that need no server state: FedIT (A and B averaged) and FFA-LoRA (A frozen, B averaged)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsb import adapters
from fedsb.methods.base import Method


@dataclass
class FedIT(Method):
    """Plain LoRA, A and B averaged separately: mean(B)·mean(A) ≠ mean(B·A) (inexact)."""

    def build(self, model, layer_names, round_idx=0):
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)  # every client starts from the same A
            return adapters.inject_lora(model, layer_names, self.rank, self.scale * self.rank)


@dataclass
class FFALoRA(Method):
    """LoRA with A frozen at a seeded Kaiming init shared by all clients; only B travels (exact)."""

    def build(self, model, layer_names, round_idx=0):
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            return adapters.inject_lora(model, layer_names, self.rank, self.scale * self.rank, train_a=False)
