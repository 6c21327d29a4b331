"""LoRA-SB's update-approximation initialization (DESIGN.md §1).

1. ``G = Σ_samples ∂L/∂W0`` per adapted layer (``accumulate_gradients``; the clients do this),
2. ``ΔW = -η·sign(Ḡ)`` (the first Adam step) or ``-η·Ḡ``,
3. truncated SVD ``ΔW ≈ U_r S_r V_rᵀ``,
4. ``B = U_r``, ``A = V_rᵀ``, ``R0 = S_r / s``, so ``s·B·R0·A`` is the best rank-r approximation of ΔW.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from fedsb.adapters.layers import SBLinear, weight_as_mn

log = logging.getLogger(__name__)

# Above this smaller dimension the randomized SVD is used by ``svd="auto"``: exact SVD of a
# 4096×4096 matrix costs seconds per layer on a CPU, svd_lowrank a fraction of that.
AUTO_EXACT_MAX_DIM = 1024


@dataclass
class Basis:
    """The fixed part of one SB layer plus its initial R."""

    B: torch.Tensor  # m × r, orthonormal columns
    A: torch.Tensor  # r × n, orthonormal rows
    R0: torch.Tensor  # r × r, diagonal S_r / s


def accumulate_gradients(
    model: nn.Module,
    layer_names: list[str],
    batches: Iterable[dict],
    loss_fn: Callable[[nn.Module, dict], torch.Tensor],
) -> tuple[dict[str, torch.Tensor], int]:
    """Sum over examples of ``∂L/∂W0`` (as m×n matrices) for the named linear layers.

    ``loss_fn`` returns one loss per example; summing them makes the weight gradient the sum of
    per-example gradients. The weights are made to require grad only for this pass.
    """
    modules = {n: model.get_submodule(n) for n in layer_names}
    was = {n: m.weight.requires_grad for n, m in modules.items()}
    sums = {n: torch.zeros_like(weight_as_mn(m), dtype=torch.float32) for n, m in modules.items()}
    count = 0
    model.eval()  # no dropout: the direction should not depend on dropout noise
    try:
        for m in modules.values():
            m.weight.requires_grad_(True)
            m.weight.grad = None
        for batch in batches:
            losses = loss_fn(model, batch)
            losses.sum().backward()
            count += int(losses.shape[0])
            for n, m in modules.items():
                sums[n] += weight_as_mn(m, m.weight.grad).float()
                m.weight.grad = None
        model.zero_grad(set_to_none=True)
    finally:
        for n, m in modules.items():
            m.weight.requires_grad_(was[n])
    return sums, count


def truncated_svd(M: torch.Tensor, rank: int, method: str = "auto", seed: int = 0):
    """Top-``rank`` singular triplets of M: (U m×r, S r, Vh r×n), exact or randomized."""
    if method == "auto":
        method = "exact" if min(M.shape) <= AUTO_EXACT_MAX_DIM else "randomized"
    M64 = M.double()
    if method == "exact":
        U, S, Vh = torch.linalg.svd(M64, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    if method != "randomized":
        raise ValueError(f"unknown SVD method {method!r}")
    # Oversampling + power iterations: sign matrices have slowly decaying spectra, so a few
    # subspace iterations are needed for the top-r subspace to be accurate.
    q = min(rank + max(10, rank // 2), min(M.shape))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(M64, q=q, niter=6)
    return U[:, :rank], S[:rank], V[:, :rank].t()


def update_approximation(
    grad_sum: torch.Tensor,
    count: int,
    rank: int,
    *,
    scale: float = 1.0,
    update: str = "sign",
    lr: float = 1e-3,
    svd: str = "auto",
    seed: int = 0,
) -> Basis:
    """Basis from an accumulated gradient: ΔW = -η·sign(Ḡ) (or -η·Ḡ), then a rank-r SVD."""
    if count <= 0:
        raise ValueError("no examples contributed to the initialization gradient")
    g = grad_sum.double() / count
    if update == "sign":
        dW = -lr * torch.sign(g)
    elif update == "grad":
        dW = -lr * g
    else:
        raise ValueError(f"unknown init-update {update!r}; use 'sign' or 'grad'")
    U, S, Vh = truncated_svd(dW, rank, svd, seed)
    return Basis(B=U.float(), A=Vh.float(), R0=torch.diag(S / scale).float())


def compute_bases(
    grad_sums: Mapping[str, torch.Tensor], count: int, rank: int, **kw
) -> dict[str, Basis]:
    return {n: update_approximation(g, count, rank, **kw) for n, g in grad_sums.items()}


def random_bases(shapes: Mapping[str, tuple[int, int]], rank: int, seed: int) -> dict[str, Basis]:
    """Data-independent bases (``init-basis = "random"``): B, A orthonormal from a seeded Gaussian (QR), R0 = 0.

    For when the update approximation cannot see the data: under DP at the ε measured in BENCHMARKS.md the
    noised init gradient yields a basis no closer to the clean one than a random subspace, so drawing one
    at random gives the same subspace for no upload and no privacy spent. R0 = 0: the adapter starts at W0.
    """
    out = {}
    for name, (m, n) in shapes.items():
        # seeded by the layer's name, not its position: the server lists layers in target order and a node
        # in module order, and both must draw the same B, A for the same layer (crc32 is stable everywhere)
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        B, _ = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))
        A, _ = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))
        out[name] = Basis(B=B.float(), A=A.t().contiguous().float(), R0=torch.zeros(rank, rank))
    return out


def weight_bases(weights: Mapping[str, torch.Tensor], rank: int, directions: str = "principal") -> dict[str, Basis]:
    """Bases from the frozen weights alone (``init-basis = "weights"``): B, A the top (``principal``, as
    LoRA-XS and PiSSA take them) or bottom (``minor``, MiLoRA's choice) ``rank`` singular vectors of W0 (m×n),
    R0 = 0. Every node computes them from its own copy of the model, so nothing travels and no data is used.

    Computed by the exact SVD in float64 so that two machines agree to far below the basis dtype's rounding,
    and each singular pair's sign is fixed (the largest-magnitude entry of each column of B is positive),
    since an SVD routine may return ``(-u, -v)`` for ``(u, v)``. Agreement bit for bit is then checked by the
    fingerprint; a node that disagrees is sent the matrices.
    """
    if directions not in ("principal", "minor"):
        raise ValueError(f"unknown weight directions {directions!r}; use 'principal' or 'minor'")
    out = {}
    for name, W in weights.items():
        U, _, Vh = torch.linalg.svd(W.detach().double().cpu(), full_matrices=False)
        if rank > U.shape[1]:
            raise ValueError(f"rank {rank} exceeds layer {name}'s smaller dimension {U.shape[1]}")
        U, Vh = (U[:, :rank], Vh[:rank]) if directions == "principal" else (U[:, -rank:], Vh[-rank:])
        pivot = U.abs().argmax(dim=0)
        sign = torch.sign(U[pivot, torch.arange(U.shape[1])])
        sign[sign == 0] = 1.0
        out[name] = Basis(B=(U * sign).float().contiguous(), A=(Vh * sign[:, None]).float().contiguous(),
                          R0=torch.zeros(rank, rank))
    return out


def apply_bases(layers: Mapping[str, SBLinear], bases: Mapping[str, Basis]) -> None:
    for n, layer in layers.items():
        b = bases[n]
        layer.set_basis(b.B, b.A, b.R0)


class SignVote:
    """The server side of the 1-bit init upload: the example-weighted majority vote of the clients' signs.

    ``result()`` is ``Σ_i w_i·s_i`` per entry (``s_i = ±1``); its sign is ``sign(Σ_i w_i·sign(G_i))``, which is
    what ``update_approximation`` with ``update="sign"`` needs (a tie gives 0). Equal to ``sign(Σ G_i)``
    wherever the clients agree; one vector in memory whatever the number of clients.
    """

    def __init__(self, n: int):
        self.votes = np.zeros(n, dtype=np.float64)

    def add(self, signs: np.ndarray, weight: float) -> None:
        self.votes += float(weight) * signs

    def result(self) -> np.ndarray:
        return self.votes
