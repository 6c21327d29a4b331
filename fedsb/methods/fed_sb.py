"""Fed-SB: LoRA-SB layers with a basis (B, A) fixed once by the server; only R (and the head) travel.

The mean of R is exact: ``Σ w_i (W0 + s·B·R_i·A) = W0 + s·B·(Σ w_i R_i)·A``. A client receives the basis
once and keeps it in its node state and an on-disk cache keyed by the basis fingerprint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
import numpy as np
from torch import nn

from fedsb import adapters
from fedsb.methods.base import Download, Method, ModelSource, NodeStore
from fedsb.ops.basis_cache import BasisCache
from fedsb.adapters.layers import weight_as_mn
from fedsb.adapters.sb_init import Basis, apply_bases, random_bases, weight_bases
from fedsb.wire import basis_fingerprint, basis_tensors, flatten, layers_fingerprint, round_basis, unflatten_into

log = logging.getLogger(__name__)

BASIS_KEY = "fedsb-basis"
WEIGHT_BASES = {"weights": "principal", "weights-minor": "minor"}  # init-basis -> weight_bases' directions

# Per-process cache of the adapted model for the current basis: a simulated client process serves many
# rounds (and nodes); re-building the model each message would dominate the round time.
_MODEL_CACHE: dict[tuple, nn.Module] = {}


@dataclass
class FedSB(Method):
    """LoRA-SB layers; only R (and the head) travel; the mean of R is exact."""

    needs_basis = True
    supports_nested_ranks = True
    init_spends_privacy = True  # the init gradient (unless init-basis is random or weights, or init-source=server)

    @classmethod
    def scale_for(cls, scale: float, lora_alpha: float, rank: int) -> float:
        return scale

    def build(self, model, layer_names, round_idx=0):
        return adapters.inject_sb(model, layer_names, self.rank, self.scale)

    def block_index(self, model: nn.Module, rank: int) -> np.ndarray | None:
        """Nested ranks: a node at rank k < r trains the leading k×k block of every R (B's first k columns,
        A's first k rows: the k leading directions of the SVD) and the whole head. Its vector holds those
        entries in the global vector's order; this returns their positions in it."""
        if rank == self.rank:
            return None
        if not 1 <= rank < self.rank:
            raise ValueError(f"a node's rank must be in [1, {self.rank}], got {rank}")
        out, offset = [], 0
        for name, t in self.trainable(model).items():
            if name.endswith("sb_R.weight"):
                out.append(offset + (np.arange(rank)[:, None] * self.rank + np.arange(rank)[None, :]).ravel())
            else:
                out.append(offset + np.arange(t.numel()))
            offset += t.numel()
        return np.concatenate(out)

    def client_model(self, task: ModelSource, download: Download, store: NodeStore) -> nn.Module | None:
        if download.basis_seed is not None:
            download.basis = regenerate_random_basis(task, task.cfg.rank, download.basis_seed,
                                                     None if self.rank < task.cfg.rank else download.fingerprint, self.rank)
        vec = basis_for(download, store)
        if vec is None and task.cfg.init_basis in WEIGHT_BASES:  # nothing was sent: this node computes it
            download.basis = regenerate_weight_basis(task, download.fingerprint, self.rank)
            vec = basis_for(download, store)
        if vec is None:
            return None
        key = (task.cfg, download.fingerprint)
        if key not in _MODEL_CACHE:
            _MODEL_CACHE.clear()  # one basis at a time per process
            model = task.base_model()
            layers = self.build(model, task.layer_names)
            unflatten_into(basis_tensors(layers), vec)
            got = layers_fingerprint(task.model_id, self.rank, layers)
            if got != download.fingerprint:
                raise RuntimeError(f"basis does not match its fingerprint ({got} != {download.fingerprint}): this "
                                   f"node's model {task.model_path} (content {task.model_id}) is not the server's, "
                                   "or the basis was corrupted in transfer or cache")
            _MODEL_CACHE[key] = model
        return _MODEL_CACHE[key]


class BasisSeedMismatch(RuntimeError):
    """The random basis this node regenerated from the seed is not the server's (other library versions):
    the node asks for the matrices instead."""


def regenerate_random_basis(task: ModelSource, rank: int, seed: int, fingerprint: str | None, k: int | None = None) -> np.ndarray:
    """B, A of ``init-basis = "random"`` from the seed alone, rounded to basis-dtype as the server's were,
    checked against the server's fingerprint (when given): bit for bit the same basis, for 8 bytes on the
    wire. A node of nested rank k checks its leading block against its own fingerprint instead."""
    model = task.base_model()
    layers = adapters.inject_sb(model, task.layer_names, rank)
    bases = random_bases({n: (l.out_features, l.in_features) for n, l in layers.items()}, rank, seed)
    for b in bases.values():
        b.B, b.A = round_basis(b.B, task.cfg.basis_dtype), round_basis(b.A, task.cfg.basis_dtype)
    apply_bases(layers, bases)
    if fingerprint is not None and layers_fingerprint(task.model_id, rank, layers) != fingerprint:
        raise BasisSeedMismatch(f"the basis regenerated from seed {seed} does not match fingerprint {fingerprint}")
    return flatten(basis_tensors(layers, k or rank))


def bases_from_weights(task: ModelSource, model: nn.Module | None = None) -> dict[str, Basis]:
    """B, A of ``init-basis = "weights"`` (or ``weights-minor``) from this party's own frozen W0, rounded to
    basis-dtype: the server and every node run this same code on their own copy of the model."""
    model = model if model is not None else task.base_model()
    weights = {n: weight_as_mn(model.get_submodule(n)) for n in task.layer_names}
    bases = weight_bases(weights, task.cfg.rank, WEIGHT_BASES[task.cfg.init_basis])
    for b in bases.values():
        b.B, b.A = round_basis(b.B, task.cfg.basis_dtype), round_basis(b.A, task.cfg.basis_dtype)
    return bases


def regenerate_weight_basis(task: ModelSource, fingerprint: str, k: int) -> np.ndarray:
    """This node's basis vector (its leading rank-k block) computed from its own W0, checked against the
    server's fingerprint for it; a mismatch (another LAPACK rounding a singular vector differently) raises
    ``BasisSeedMismatch`` and the node asks for the matrices instead."""
    model = task.base_model()
    bases = bases_from_weights(task, model)  # read W0 before the SB layers wrap it
    layers = adapters.inject_sb(model, task.layer_names, task.cfg.rank)
    apply_bases(layers, bases)
    tensors = basis_tensors(layers, k)  # the order the server packs and fingerprints them in
    got = basis_fingerprint(task.model_id, k, {n: (tensors[n + ".B"], tensors[n + ".A"]) for n in layers})
    if got != fingerprint:
        raise BasisSeedMismatch(f"the basis computed from this node's weights ({got}) does not match fingerprint {fingerprint}")
    return flatten(tensors)


def basis_for(download: Download, store: NodeStore, cache: BasisCache | None = None) -> np.ndarray | None:
    """The basis vector for ``download.fingerprint``: from the message, the node state, or the disk cache
    (each re-verified against the fingerprint by the caller before it is trusted)."""
    cache = cache or BasisCache()
    fp = download.fingerprint
    if download.basis is not None:
        store.put(BASIS_KEY, {"basis": download.basis}, {"fingerprint": fp})
        cache.put(fp, download.basis)
        return download.basis
    held = store.get(BASIS_KEY)
    if held is not None and held[1].get("fingerprint") == fp:
        return held[0]["basis"]
    vec = cache.get(fp)
    if vec is not None:
        store.put(BASIS_KEY, {"basis": vec}, {"fingerprint": fp})
    return vec
