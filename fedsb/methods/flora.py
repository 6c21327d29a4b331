"""FLoRA: every round the clients' (w_i·B_i, A_i) are stacked into W0 (exact); the global rank grows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsb import adapters
from fedsb.methods.base import Download, Method, ModelSource, NodeStore
from fedsb.wire import flatten, split, unflatten_into

STACKS_KEY = "fedsb-flora"


@dataclass
class FLoRA(Method):
    """FLoRA: every round the clients' (w_i·B_i, A_i) are stacked — the product is Σ w_i B_i A_i exactly —
    folded into W0, and the adapter is re-initialized. The global rank grows by clients × r per round.

    The server keeps each round's stack; a node receives the stacks it has not folded yet.
    """

    stacks: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)
    held: dict[int, int] = field(default_factory=dict)  # server: number of folded stacks each node holds
    streamable = False  # the stack keeps every client's factors
    supports_secagg = False  # the stacks are each client's own factors, which secure aggregation hides
    modifies_base = True  # each round's stack is folded into W0

    def build(self, model, layer_names, round_idx=0):
        with torch.random.fork_rng():
            torch.manual_seed(self.seed + 1000 * round_idx)  # fresh adapter every round, same on all clients
            return adapters.inject_lora(model, layer_names, self.rank, self.scale * self.rank)

    def aggregate(self, model, vectors, weights, combine):
        layers = adapters.adapter_layers(model)
        trainable = self.trainable(model)
        w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        stack = {}
        for n in layers:
            Bs, As = [], []
            for vec, wi in zip(vectors, w):
                parts = split(trainable, vec)
                Bs.append(float(wi) * self.scale * parts[n + ".lora_B.weight"].float())
                As.append(parts[n + ".lora_A.weight"].float())
            stack[n] = (torch.cat(Bs, dim=1), torch.cat(As, dim=0))  # m × kr, kr × n
        self.stacks.append(stack)
        fold_stacks(model, [stack])
        # the head (non-adapter trainables) is averaged; LoRA parts restart from their init
        new = combine(vectors, weights)
        return new

    def after_round(self, model, round_idx):
        # the LoRA factors restart from a fresh init each round (the next round's seed); heads keep their mean
        with torch.random.fork_rng():
            torch.manual_seed(self.seed + 1000 * (round_idx + 1))
            for layer in adapters.adapter_layers(model).values():
                layer.reset_lora()

    def round_config(self) -> dict[str, Any]:
        return {"flora-stacks": len(self.stacks)}

    def extra_download(self, node: int) -> dict[str, np.ndarray]:
        # each node receives only the stacks it has not folded yet (it keeps the rest in its state)
        held = self.held.get(node, 0)
        self.held[node] = len(self.stacks)
        return self.stacks_since(held)

    def forget_node(self, node: int) -> None:
        self.held.pop(node, None)

    def node_state(self) -> dict[str, Any]:
        return {"flora_held": {str(k): v for k, v in self.held.items()}}

    def load_node_state(self, state: dict[str, Any]) -> None:
        self.held = {int(k): v for k, v in state.get("flora_held", {}).items()}

    def client_model(self, task: ModelSource, download: Download, store: NodeStore) -> nn.Module | None:
        # the node keeps every folded stack; the server sends only the ones it lacks
        stored = store.get(STACKS_KEY)
        held = dict(stored[0]) if stored is not None else {}
        held.update(download.extra)
        total = int(download.config.get("flora-stacks", 0))
        if sorted(held) != sorted(f"stack-{t}" for t in range(total)):
            return None  # lost state (restart): ask for all stacks again
        store.put(STACKS_KEY, held)
        model = task.base_model()
        self.build(model, task.layer_names, round_idx=download.round)
        self.apply_extra(model, held)
        return model

    def stacks_since(self, held: int) -> dict[str, np.ndarray]:
        out = {}
        for t in range(held, len(self.stacks)):
            out[f"stack-{t}"] = flatten({f"{n}.{i}": x for n, (B, A) in self.stacks[t].items() for i, x in (("B", B), ("A", A))})
        return out

    def apply_extra(self, model, extra):
        """Client: fold stacks (in round order) into the base; each is Σ_layers (m+n)·K numbers."""
        layers = adapters.adapter_layers(model)
        per_rank = sum(l.out_features + l.in_features for l in layers.values())
        for key in sorted((k for k in extra if k.startswith("stack-")), key=lambda k: int(k.split("-")[1])):
            vec = extra[key]
            K = vec.size // per_rank
            if K * per_rank != vec.size:
                raise ValueError(f"{key}: {vec.size} numbers is not a whole stack")
            parts = {}
            for n, l in layers.items():
                parts[f"{n}.B"] = torch.zeros(l.out_features, K)
                parts[f"{n}.A"] = torch.zeros(K, l.in_features)
            unflatten_into(parts, vec)
            fold_stacks(model, [{n: (parts[f"{n}.B"], parts[f"{n}.A"]) for n in layers}])

    def server_state(self):
        out = {}
        for t, stack in enumerate(self.stacks):
            for n, (B, A) in stack.items():
                out[f"stack.{t}.{n}.B"], out[f"stack.{t}.{n}.A"] = B, A
        return out

    def load_server_state(self, model, state):
        T = len({k.split(".")[1] for k in state if k.startswith("stack.")})
        layers = list(adapters.adapter_layers(model))
        self.stacks = [{n: (state[f"stack.{t}.{n}.B"], state[f"stack.{t}.{n}.A"]) for n in layers} for t in range(T)]
        fold_stacks(model, self.stacks)

    def global_rank(self, layer: str) -> int:
        return sum(s[layer][1].shape[0] for s in self.stacks)


@torch.no_grad()
def fold_stacks(model: nn.Module, stacks: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> None:
    layers = adapters.adapter_layers(model)
    for stack in stacks:
        for n, (B, A) in stack.items():
            w = adapters.weight_as_mn(layers[n].base_layer)
            w += (B.double() @ A.double()).to(device=w.device, dtype=w.dtype)
