"""Client-side differential privacy: Opacus DP-SGD for local rounds, a private init gradient, accounting.

- Local training: Opacus ``GradSampleModule`` (per-sample gradients of the trainable parameters only:
  R and head for Fed-SB, LoRA factors for the baselines) + ``DPOptimizer`` (clip to C, add N(0, σ²C²)).
  Batches are Poisson-sampled here (each example joins a step with probability q = batch/n); an empty
  batch is a noise-only step, which the accountant counts like any other.
- Initialization: each example's gradient of the frozen target weights (all layers jointly) is clipped to
  C, the clipped gradients are summed, and N(0, σ²C²) noise is added per coordinate before the sum
  leaves the client. The examples are Poisson-sampled at q = init-samples/n, so that is one step of the
  subsampled Gaussian mechanism, accounted exactly as such.
- Secrecy: amplification by subsampling holds only if nobody who sees the updates can tell which examples
  were sampled, and the noise only if nobody can replay it; the server knows every seed of the run, so
  both the Poisson masks and the noise are drawn from OS entropy (``secret_generator``), never from seeds.
- Accounting: one Opacus accountant per client whose history ``[(σ, q, steps), ...]`` persists across
  rounds (node state and checkpoints); ε of the whole run is computed from it, and σ can be calibrated
  beforehand so that the whole horizon (init + every round's local steps) meets ``target-epsilon``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from fedsb.logs import root_unconfigured
from fedsb.tasks.training import step_lrs

log = logging.getLogger(__name__)

History = list[tuple[float, float, int]]


def secret_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from OS entropy: for DP noise and Poisson sampling, which must not be derivable
    from the run config (the server knows its seeds). Noise is drawn on the parameters' device."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def poisson_indices(n: int, q: float, generator: torch.Generator) -> list[int]:
    """Poisson sampling: each of the n examples is included independently with probability q."""
    return torch.nonzero(torch.rand(n, generator=generator) < q).flatten().tolist()


@functools.cache
def _import_opacus() -> None:
    """Import Opacus without the root log handler its import sets up (``fedsb.logs.root_unconfigured``)."""
    with root_unconfigured():
        import opacus  # noqa: F401


def make_accountant(name: str, history: History | None = None):
    _import_opacus()
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = {"prv": PRVAccountant, "rdp": RDPAccountant}[name]()
    acc.history = [tuple(h) for h in (history or [])]
    return acc


def merge_history(history: History) -> History:
    """Adjacent entries with the same (σ, q) merged: the accountant's result is the same, the list shorter."""
    out: History = []
    for sigma, q, steps in history:
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((float(sigma), float(q), int(steps)))
    return out


def epsilon_from_history(history: History, delta: float, accountant: str = "prv") -> float:
    if not history:
        return 0.0
    return float(make_accountant(accountant, merge_history(history)).get_epsilon(delta=delta))


def default_delta(min_client_examples: int) -> float:
    """δ below 1/n for the smallest client: 1/(10·n)."""
    return 1.0 / (10 * max(1, min_client_examples))


def calibrate_noise(target_epsilon: float, delta: float, phases: list[tuple[float, int]], accountant: str = "prv",
                    tolerance: float = 0.01) -> float:
    """Smallest σ (to within ``tolerance`` in ε) such that ε of the whole horizon ≤ target.

    ``phases`` is the planned horizon as [(sample_rate, steps), ...]; Opacus' get_noise_multiplier
    takes a single sample rate, and the init step has its own, hence this bisection. A pure function of
    its arguments, and seconds of CPU (dozens of accountant calls): a client process that serves every
    round of a run asks the same question each round, so the answer is kept (``_calibrated``).
    """
    return _calibrated(float(target_epsilon), float(delta), tuple((float(q), int(s)) for q, s in phases),
                       accountant, float(tolerance))


@functools.lru_cache(maxsize=256)
def _calibrated(target_epsilon: float, delta: float, phases: tuple[tuple[float, int], ...], accountant: str,
                tolerance: float) -> float:
    def eps(sigma: float) -> float:
        return epsilon_from_history([(sigma, q, s) for q, s in phases if s > 0], delta, accountant)

    lo, hi = 0.0, 10.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise ValueError(f"target-epsilon {target_epsilon} cannot be met for this horizon; raise it")
    while True:
        mid = (lo + hi) / 2
        e = eps(mid)
        if e > target_epsilon:
            lo = mid
        else:
            hi = mid
            if target_epsilon - e < tolerance * target_epsilon:
                return hi
        if hi - lo < 1e-4:
            return hi


@dataclass
class PrivateTrainResult:
    mean_loss: float
    history: History
    epsilon: float
    steps: int
    empty_steps: int


def private_train(model: nn.Module, dataset, collate_fn, *, steps: int, batch_size: int, lr: float | Sequence[float],
                  weight_decay: float, noise_multiplier: float, max_grad_norm: float, history: History,
                  accountant: str, grad_sample_mode: str, loss_fn: Callable, delta: float,
                  sampling_generator: torch.Generator | None = None, progress: bool = False) -> PrivateTrainResult:
    """``steps`` DP-SGD steps (AdamW on the clipped, noised gradients) with Poisson sampling.

    ``sampling_generator`` draws the Poisson masks; leave it ``None`` (OS entropy) outside tests: masks the
    server could reproduce would void the amplification by subsampling that the accountant counts.
    """
    _import_opacus()
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from tqdm.auto import tqdm

    n = len(dataset)
    q = min(1.0, batch_size / n)
    params = [p for p in model.parameters() if p.requires_grad]
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False, force_functorch=grad_sample_mode == "functorch")
    gen = sampling_generator if sampling_generator is not None else secret_generator()
    lrs = step_lrs(lr, steps)  # one rate, or one per step (lr-schedule)
    opt = DPOptimizer(torch.optim.AdamW(params, lr=lrs[0], weight_decay=weight_decay), noise_multiplier=noise_multiplier,
                      max_grad_norm=max_grad_norm, expected_batch_size=max(1, round(q * n)),
                      # the noise must not be reproducible by the server (it knows every seed): OS entropy
                      generator=secret_generator(params[0].device))
    acc = make_accountant(accountant, history)
    model.train()
    losses, empty = [], 0
    try:
        for k in tqdm(range(steps), desc="DP-SGD steps", leave=False, disable=not progress):
            for group in opt.param_groups:
                group["lr"] = lrs[k]
            idx = poisson_indices(n, q, gen)
            opt.zero_grad(set_to_none=True)
            if idx:
                batch = collate_fn([dataset[i] for i in idx])
                loss = loss_fn(gsm, batch).mean()
                loss.backward()
                losses.append(float(loss.detach()))
            else:
                # HF models cannot run an empty batch: a noise-only step, counted like any other
                empty += 1
                for p in params:
                    p.grad_sample = torch.zeros(0, *p.shape, dtype=p.dtype)
            opt.step()
            acc.step(noise_multiplier=noise_multiplier, sample_rate=q)
    finally:
        gsm._close()  # remove the hooks: the model is a plain module again for the next round
        for p in params:
            for attr in ("grad_sample", "summed_grad", "_forward_counter"):
                if hasattr(p, attr):
                    delattr(p, attr)
        model.eval()
    new_history = merge_history(list(acc.history))
    return PrivateTrainResult(float(np.mean(losses)) if losses else float("nan"), new_history,
                              epsilon_from_history(new_history, delta, accountant), steps, empty)


def private_gradient_sum(model: nn.Module, layer_names: list[str], batches, *, max_grad_norm: float,
                         noise_multiplier: float, loss_fn: Callable, generator: torch.Generator,
                         weight_of: Callable[[nn.Module], torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Σ_i clip_C(∂ℓ_i/∂W0) + N(0, σ²C²) over the examples of ``batches``, per target layer (m×n).

    Per-example gradients come from one backward pass per example: the target weights hold ~10M
    numbers on MiniLM, so materialising per-sample gradients of all of them for a batch (what a
    vectorised per-sample method would do) would need GBs; a loop over a few dozen examples does not.
    """
    from fedsb.adapters import weight_as_mn

    modules = {n: model.get_submodule(n) for n in layer_names}
    sums = {n: torch.zeros_like(weight_as_mn(m), dtype=torch.float32) for n, m in modules.items()}
    count = 0
    was = {n: m.weight.requires_grad for n, m in modules.items()}
    model.eval()
    try:
        for m in modules.values():
            m.weight.requires_grad_(True)
        for batch in batches:
            size = int(next(iter(batch.values())).shape[0])
            for i in range(size):
                one = {k: v[i : i + 1] for k, v in batch.items()}
                for m in modules.values():
                    m.weight.grad = None
                loss_fn(model, one).sum().backward()
                grads = {n: weight_as_mn(m, m.weight.grad).float() for n, m in modules.items()}
                norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
                factor = min(1.0, max_grad_norm / (norm + 1e-12))
                for n, g in grads.items():
                    sums[n] += factor * g
                count += 1
        model.zero_grad(set_to_none=True)
    finally:
        for n, m in modules.items():
            m.weight.requires_grad_(was[n])
    std = noise_multiplier * max_grad_norm
    if std > 0:
        for n in sums:
            noise = torch.normal(0.0, std, size=sums[n].shape, generator=generator, device=generator.device)
            sums[n] += noise.to(sums[n].device)
    return sums, count
