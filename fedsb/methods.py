"""Federated fine-tuning methods: an adapter (what trains) + an aggregation rule + what messages carry.

Every method shares one round loop (server/) and one local trainer (fedsb.training); a method only says
how to put adapters on a base model, which tensors travel each round, and how the server combines
them. All tensors that travel are flattened into ONE float32 vector per message ("adapter"), so the
wire format costs ≈ 4 bytes per number whatever the number of layers (DESIGN.md §1 table):

| method     | trains      | aggregate                                   | per-round extra download     |
|------------|-------------|---------------------------------------------|------------------------------|
| fed-sb     | R, head     | weighted mean of R (exact)                  | —  (B, A once per node)      |
| fedit      | A, B, head  | mean A, mean B (inexact)                    | —                            |
| ffa-lora   | B, head     | mean B, A frozen from a shared seed (exact) | —                            |
| fedex-lora | A, B, head  | mean A, mean B + residual folded into W0    | cumulative residual (m·n)    |
| flora      | A, B, head  | stack all clients' (w·B, A) into W0 (exact) | stacks the node has not seen |
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedsb import adapters
from fedsb.adapters import LoRALinear, SBLinear

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Flat packing of named tensors
# ---------------------------------------------------------------------------------------------


def flatten(tensors: dict[str, torch.Tensor]) -> np.ndarray:
    if not tensors:
        return np.zeros(0, dtype=np.float32)
    return torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors.values()]).numpy()


@torch.no_grad()
def unflatten_into(tensors: dict[str, torch.Tensor], vec: np.ndarray) -> None:
    """Copy a flat vector back into the named tensors (same order and sizes as ``flatten``)."""
    expected = sum(t.numel() for t in tensors.values())
    if vec.shape != (expected,):
        raise ValueError(f"flat vector has shape {vec.shape}, expected ({expected},)")
    src = torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float32))
    offset = 0
    for t in tensors.values():
        n = t.numel()
        t.copy_(src[offset : offset + n].view_as(t).to(t.dtype))
        offset += n


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


@dataclass
class Method:
    """Base: the trainable parameters travel as one flat vector and are averaged (FedAvg)."""

    name: str
    rank: int
    scale: float  # s for fed-sb; alpha / r for the LoRA methods
    exact: bool = True
    seed: int = 0
    streamable = True  # the aggregate is a running weighted mean of the vectors (no per-client state)

    # -- model side (client and server) --------------------------------------------------------
    def build(self, model: nn.Module, layer_names: list[str], round_idx: int = 0) -> dict[str, nn.Module]:
        raise NotImplementedError

    def trainable(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors that travel each round, in a fixed order: what ``flatten`` packs."""
        return adapters.trainable_state(model)

    def get_vector(self, model: nn.Module) -> np.ndarray:
        return flatten(self.trainable(model))

    def set_vector(self, model: nn.Module, vec: np.ndarray) -> None:
        unflatten_into(self.trainable(model), vec)

    # -- server side ---------------------------------------------------------------------------
    def aggregate(self, model: nn.Module, vectors: list[np.ndarray], weights: list[float], combine) -> np.ndarray:
        """New global vector from the clients' vectors. ``combine`` is the (robust) mean to use."""
        return combine(vectors, weights)

    def after_round(self, model: nn.Module, round_idx: int) -> None:
        """Server-side hook once the new global vector is in the model."""

    def server_state(self) -> dict[str, torch.Tensor]:
        """Method state the server must checkpoint (beyond the global vector)."""
        return {}

    def load_server_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        pass

    # -- client side: what the server sends beyond the global vector --------------------------
    def apply_extra(self, model: nn.Module, extra: dict[str, np.ndarray]) -> None:
        """Client: fold method-specific downloads (FedEx residual, FLoRA stacks) into the base."""


@dataclass
class FedSB(Method):
    """LoRA-SB layers; only R (and the head) travel; the mean of R is exact."""

    def build(self, model, layer_names, round_idx=0):
        return adapters.inject_sb(model, layer_names, self.rank, self.scale)


@dataclass
class FedIT(Method):
    """Plain LoRA, A and B averaged separately: mean(B)·mean(A) ≠ mean(B·A) (inexact)."""

    exact: bool = False

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


@dataclass
class FedExLoRA(FedIT):
    """FedIT plus the residual mean(B_i·A_i) − mean(B)·mean(A) folded into the frozen W0 (exact).

    The server keeps the cumulative residual per layer; clients receive it every round (m·n numbers
    per layer, counted in the download bytes) and add it to their frozen base weights.
    """

    exact: bool = True
    residual: dict[str, torch.Tensor] = field(default_factory=dict)
    streamable = False  # the residual needs every client's own A_i, B_i

    def aggregate(self, model, vectors, weights, combine):
        layers = adapters.adapter_layers(model)
        trainable = self.trainable(model)
        w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        # mean of the products, per layer, from each client's own A_i, B_i
        prod_mean = {n: torch.zeros(l.out_features, l.in_features, dtype=torch.float64) for n, l in layers.items()}
        for vec, wi in zip(vectors, w):
            parts = _split(trainable, vec)
            for n in layers:
                prod_mean[n] += wi * (parts[n + ".lora_B.weight"].double() @ parts[n + ".lora_A.weight"].double())
        new = combine(vectors, weights)
        parts = _split(trainable, new)
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

    def extra_download(self) -> dict[str, np.ndarray]:
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


@dataclass
class FLoRA(Method):
    """FLoRA: every round the clients' (w_i·B_i, A_i) are stacked — the product is Σ w_i B_i A_i exactly —
    folded into W0, and the adapter is re-initialized. The global rank grows by clients × r per round.

    The server keeps each round's stack; a node receives the stacks it has not folded yet.
    """

    stacks: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)
    streamable = False  # the stack keeps every client's factors

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
                parts = _split(trainable, vec)
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


def _split(trainable: dict[str, torch.Tensor], vec: np.ndarray) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    src = torch.from_numpy(np.asarray(vec, dtype=np.float32))
    for n, t in trainable.items():
        out[n] = src[offset : offset + t.numel()].view(t.shape)
        offset += t.numel()
    return out


@torch.no_grad()
def apply_weight_delta(model: nn.Module, deltas: dict[str, torch.Tensor], replace_from: dict[str, torch.Tensor] | None = None) -> None:
    """W0 ← (original W0 if given, else current W0) + delta, per adapted layer (m×n deltas)."""
    layers = adapters.adapter_layers(model)
    for n, d in deltas.items():
        base = layers[n].base_layer
        w = adapters.weight_as_mn(base)
        start = replace_from[n] if replace_from is not None else w
        w.copy_((start.double() + d.double()).to(w.dtype))


@torch.no_grad()
def fold_stacks(model: nn.Module, stacks: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> None:
    layers = adapters.adapter_layers(model)
    for stack in stacks:
        for n, (B, A) in stack.items():
            w = adapters.weight_as_mn(layers[n].base_layer)
            w += (B.double() @ A.double()).to(w.dtype)


def make_method(name: str, rank: int, scale: float, lora_alpha: float, seed: int) -> Method:
    if name == "fed-sb":
        return FedSB(name, rank, scale, seed=seed)
    lora_scale = lora_alpha / rank
    cls = {"fedit": FedIT, "ffa-lora": FFALoRA, "fedex-lora": FedExLoRA, "flora": FLoRA}.get(name)
    if cls is None:
        raise ValueError(f"unknown method {name!r}")
    return cls(name, rank, lora_scale, seed=seed)


def adapter_param_counts(model: nn.Module) -> int:
    return sum(t.numel() for n, t in adapters.trainable_state(model).items() if any(k in n for k in ("sb_R", "lora_")))


__all__ = ["Method", "FedSB", "FedIT", "FFALoRA", "FedExLoRA", "FLoRA", "make_method", "flatten", "unflatten_into",
           "apply_weight_delta", "fold_stacks", "SBLinear", "LoRALinear"]
