"""The ``Method`` plug-in: what trains, what travels, how the server combines it, how a client builds its model.

The apps call these hooks and never ask which method they run (as PEFT's layer calls its ``LoraVariant``).
A new method is one file in this folder with a subclass, registered in ``fedsb/methods/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from fedsb import adapters
from fedsb.wire import flatten, unflatten_into

Combine = Callable[[list[np.ndarray], list[float]], np.ndarray]


class ModelSource(Protocol):
    """What a method needs to build a client's model: the base model, the layers to adapt, the model id
    the basis fingerprint names, and the run config (``fedsb.tasks.Task`` is one; methods never import tasks)."""

    cfg: Any
    model_path: str  # where this party's copy lives (named in errors only)
    model_id: str  # the model's content (architecture and frozen target weights): what fingerprints name
    layer_names: list[str]

    def base_model(self) -> nn.Module: ...


class NodeStore(Protocol):
    """What a client keeps between messages (its Flower node state); fedsb sees only this interface."""

    def get(self, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None: ...

    def put(self, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> None: ...


@dataclass
class Download:
    """What a train/evaluate message brings a client besides the global vector."""

    round: int
    fingerprint: str = ""
    basis: np.ndarray | None = None  # the decoded basis, when the message carries it
    basis_seed: int | None = None  # or the seed of a random basis, for the node to regenerate it
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # method-specific arrays (extra_download)
    config: dict[str, Any] = field(default_factory=dict)  # method-specific config (round_config)


@dataclass
class Method:
    """Base: the trainable parameters travel as one flat vector and are averaged (FedAvg)."""

    name: str
    rank: int
    scale: float  # s for fed-sb; alpha / r for the LoRA methods
    seed: int = 0
    # What the method can do, asked by config validation and the apps (never the method's name):
    streamable = True  # the aggregate is a running weighted mean of the vectors (no per-client state)
    needs_basis = False  # the server runs the basis protocol (init + one-time broadcast) before round 1
    supports_secagg = True  # the server needs only the (weighted) sum of the vectors, not each client's own
    supports_nested_ranks = False  # a node may train a leading block of the global vector (block_index)
    init_spends_privacy = False  # the init query reads the clients' data (under dp, it spends budget)
    modifies_base = False  # the server folds updates into W0 (exports then carry the changed base weights)

    @classmethod
    def scale_for(cls, scale: float, lora_alpha: float, rank: int) -> float:
        """The adapter scale from the config: LoRA's alpha / r (Fed-SB: its own s)."""
        return lora_alpha / rank

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
    def aggregate(self, model: nn.Module, vectors: list[np.ndarray], weights: list[float], combine: Combine) -> np.ndarray:
        """New global vector from the clients' vectors. ``combine`` is the (robust) mean to use."""
        return combine(vectors, weights)

    def after_round(self, model: nn.Module, round_idx: int) -> None:
        """Server-side hook once the new global vector is in the model."""

    def block_index(self, model: nn.Module, rank: int) -> np.ndarray | None:
        """Where a node that trains at ``rank`` sits in the global vector (None: all of it)."""
        if rank != self.rank:
            raise ValueError(f"{self.name} trains every client at rank {self.rank}, not {rank}")
        return None

    def round_config(self) -> dict[str, Any]:
        """Config entries every train/evaluate message of this round carries (besides the vector)."""
        return {}

    def extra_download(self, node: int) -> dict[str, np.ndarray]:
        """Arrays one node receives this round beyond the global vector (FedEx residual, FLoRA stacks)."""
        return {}

    def forget_node(self, node: int) -> None:
        """The node lost its state (restart): the next ``extra_download`` must send it everything."""

    def server_state(self) -> dict[str, torch.Tensor]:
        """Method tensors the server must checkpoint (beyond the global vector)."""
        return {}

    def load_server_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        pass

    def node_state(self) -> dict[str, Any]:
        """JSON bookkeeping per node the server must checkpoint (what each node already holds)."""
        return {}

    def load_node_state(self, state: dict[str, Any]) -> None:
        pass

    # -- client side ---------------------------------------------------------------------------
    def client_model(self, task: ModelSource, download: Download, store: NodeStore) -> nn.Module | None:
        """The adapted model a client trains this round, or None when the node lacks state the server
        must send again (it then answers ``need-basis``)."""
        model = task.base_model()
        self.build(model, task.layer_names, round_idx=download.round)
        self.apply_extra(model, download.extra)
        return model

    def apply_extra(self, model: nn.Module, extra: dict[str, np.ndarray]) -> None:
        """Client: fold method-specific downloads into the base."""
