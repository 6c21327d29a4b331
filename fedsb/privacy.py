"""Client-side differential privacy: Opacus DP-SGD for local rounds, a private init gradient, accounting.

Pure PyTorch + Opacus (no Flower). Three parts:

- ``private_train``: ``steps`` DP-SGD steps (AdamW on the trainable parameters: R and head for Fed-SB, LoRA
  factors for the baselines). Each step Poisson-samples the local data (every example joins with
  probability q = batch/n), Opacus computes per-sample gradients (hooks, functorch or expanded weights),
  ``DPOptimizer`` clips each sample's gradient to C and adds N(0, σ²C²). An empty Poisson batch is a
  noise-only step that the accountant counts (HF models cannot run a batch of size 0).
- ``private_gradient_sum``: the Fed-SB initialization gradient Σ_i clip_C(∂ℓ_i/∂W0) + N(0, σ²C²), the
  clipping joint over all target weights of one example. One Gaussian-mechanism step with rate m/n.
- Accounting: one Opacus accountant per client whose history ``[(σ, q, steps), ...]`` persists across
  rounds (``state_dict`` / ``load_state_dict``); ε of the whole run comes from it, and σ can be calibrated
  beforehand so that the whole planned horizon (init step + every round's local steps) meets the target.

Privacy caveat for callers: DP holds only if the noise is unpredictable to whoever sees the output. A
seed (or generator state) that the server can derive, e.g. from the run config, lets it regenerate and
subtract the noise. ``seed=None`` draws the randomness from the OS; fixed seeds are for tests and
bit-for-bit reproducible simulations.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

History = list[tuple[float, float, int]]  # [(noise_multiplier σ, sample_rate q, steps), ...]
LossFn = Callable[[nn.Module, dict], torch.Tensor]  # per-example losses, shape [batch], no reduction

ACCOUNTANTS = ("prv", "rdp")  # both accept histories whose σ or q change; Opacus' gdp does not
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew")
# Opacus' own clip factor C / (‖g‖ + 1e-6): used in both our init path and DPOptimizer, so the two agree.
_CLIP_EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------------


def _check_accountant(name: str) -> None:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; use one of {ACCOUNTANTS} (gdp cannot compose "
                         "the init step and the rounds, whose sample rates differ)")


def _normalise_history(history: Iterable[Sequence]) -> History:
    """Entries as (float, float, int) tuples: histories come back from JSON / Flower records as lists."""
    out: History = []
    for entry in history or []:
        if len(entry) != 3:
            raise ValueError(f"history entries are (noise_multiplier, sample_rate, steps), got {entry!r}")
        sigma, q, steps = float(entry[0]), float(entry[1]), int(entry[2])
        if sigma < 0 or not 0.0 <= q <= 1.0 or steps < 0:
            raise ValueError(f"invalid history entry {entry!r}")
        out.append((sigma, q, steps))
    return out


def merge_history(history: Iterable[Sequence]) -> History:
    """Adjacent entries with the same (σ, q) merged, zero-step entries dropped.

    This is what Opacus' own ``accountant.step()`` does to consecutive identical steps, so ε is the same
    and the list (carried in every message and checkpoint) stays short.
    """
    out: History = []
    for sigma, q, steps in _normalise_history(history):
        if steps == 0:
            continue
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
    return out


def make_accountant(name: str, history: Iterable[Sequence] | None = None):
    """A fresh Opacus accountant (``"prv"`` or ``"rdp"``) holding ``history``."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    _check_accountant(name)
    acc = {"prv": PRVAccountant, "rdp": RDPAccountant}[name]()
    acc.history = merge_history(history or [])
    return acc


def accountant_from_state(state: Mapping | None, accountant: str = "prv"):
    """The accountant restored from an Opacus ``state_dict()`` (None: a fresh one).

    The history (σ, q, steps) does not depend on the accounting method, so a state saved by another
    accountant kind is accepted (ε is then recomputed with ``accountant``) instead of refused as
    Opacus' ``load_state_dict`` would.
    """
    acc = make_accountant(accountant)
    if state is None:
        return acc
    if "history" not in state:
        raise ValueError("accountant state has no 'history' (expected an Opacus accountant state_dict())")
    mech = state.get("mechanism", acc.mechanism())
    if mech != acc.mechanism():
        log.info("accountant state saved by %r, continued with %r (same history)", mech, acc.mechanism())
    acc.load_state_dict({"history": merge_history(state["history"]), "mechanism": acc.mechanism()})
    return acc


def epsilon_from_history(history: Iterable[Sequence], delta: float, accountant: str = "prv") -> float:
    """ε after the whole history, as the Opacus accountant ``accountant`` reports it for ``delta``.

    Empty history: 0. A step with σ = 0 (and q > 0) has no privacy at all: ∞ (Opacus' PRV accountant
    would fail on it rather than say so). Steps with q = 0 touch no data and are skipped.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    hist = [h for h in merge_history(history) if h[1] > 0.0]
    _check_accountant(accountant)
    if not hist:
        return 0.0
    if any(sigma <= 0.0 for sigma, _, _ in hist):
        return math.inf
    with np.errstate(divide="ignore"):  # PRV takes log(1 - q), -inf at q = 1, and handles it
        return float(make_accountant(accountant, hist).get_epsilon(delta=delta))


def default_delta(min_client_examples: int) -> float:
    """δ below 1/n for the smallest client: 1/(10·n) (n < 1 is treated as 1)."""
    return 1.0 / (10 * max(1, int(min_client_examples)))


def init_history_entry(noise_multiplier: float, num_used: int, num_total: int) -> tuple[float, float, int]:
    """History entry of the private init gradient: one Gaussian step with rate num_used / num_total.

    The rate is an amplification-by-subsampling claim: it is valid only if the ``num_used`` examples
    are a random subset that the server does not learn (with ``num_used == num_total`` it is 1).
    """
    if num_total < 1 or not 0 <= num_used <= num_total:
        raise ValueError(f"need 0 <= num_used <= num_total and num_total >= 1, got {num_used}, {num_total}")
    return (float(noise_multiplier), min(1.0, num_used / num_total), 1)


def calibrate_noise(target_epsilon: float, delta: float, history_without_sigma: Sequence[tuple[float, int]],
                    accountant: str = "prv", tolerance: float = 0.01) -> float:
    """σ such that ε of the whole planned horizon is ≤ ``target_epsilon`` (and within ``tolerance``·target
    of it, up to a σ resolution of 1e-4 relative).

    ``history_without_sigma`` is the horizon as phases [(sample_rate, steps), ...], e.g. the init step
    [(m/n, 1)] followed by [(batch/n, rounds·local_steps)]. Opacus' ``get_noise_multiplier`` takes one
    sample rate only, hence our own bisection over σ with the accountant itself. The result always
    satisfies ε(σ) ≤ target: the bisection returns its upper, feasible end.
    """
    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    _check_accountant(accountant)
    phases = []
    for q, steps in history_without_sigma:
        if not 0.0 < float(q) <= 1.0 or int(steps) < 0:
            raise ValueError(f"invalid phase (sample_rate={q}, steps={steps})")
        if int(steps) > 0:
            phases.append((float(q), int(steps)))
    if not phases:
        raise ValueError("the planned horizon has no steps: nothing to calibrate")

    def eps(sigma: float, acc: str) -> float:
        try:
            return epsilon_from_history([(sigma, q, s) for q, s in phases], delta, acc)
        except (ValueError, RuntimeError, FloatingPointError, OverflowError) as e:
            # PRV's numerics can fail at very small σ, where ε is huge anyway: treat as infeasible.
            log.debug("accountant %s failed at sigma=%g (%s): treated as infeasible", acc, sigma, e)
            return math.inf

    def bracket(acc: str, guess: float, factor: float):
        """(lo, ε(lo), hi, ε(hi)) with ε(hi) <= target < ε(lo), found from ``guess`` in steps of ``factor``;
        None if even σ below 1e-3 meets the target (then ``hi`` is returned as is)."""
        lo, e_lo, hi, e_hi = None, math.inf, guess, eps(guess, acc)
        while e_hi > target_epsilon:
            lo, e_lo, hi = hi, e_hi, hi * factor
            if hi > 1e4:
                raise ValueError(f"target_epsilon={target_epsilon} cannot be met for this horizon; raise it")
            e_hi = eps(hi, acc)
        while lo is None:
            cand = hi / factor
            if cand < 1e-3:
                return None, hi
            e = eps(cand, acc)
            if e > target_epsilon:
                lo, e_lo = cand, e
            else:
                hi, e_hi = cand, e
        return (lo, e_lo, hi, e_hi), hi

    def search(acc: str, lo: float, e_lo: float, hi: float, e_hi: float) -> float:
        """Safeguarded false position. Invariant: ε(hi) <= target < ε(lo); returns hi once ε(hi) is
        within the tolerance of the target (or the bracket is 1e-4 narrow)."""
        goal = math.log(target_epsilon * (1 - tolerance / 2))  # aim inside the accepted band
        while hi - lo > 1e-4 * hi:
            if math.isfinite(e_lo):
                # ε falls roughly as a power of σ: interpolate log ε linearly in log σ, but stay 10% away
                # from the ends so the bracket shrinks every step even where the model is poor.
                t = (math.log(e_lo) - goal) / (math.log(e_lo) - math.log(e_hi))
                t = min(max(t, 0.1), 0.9)
                mid = math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)))
            else:
                mid = (lo + hi) / 2
            e = eps(mid, acc)
            if e > target_epsilon:
                lo, e_lo = mid, e
            else:
                hi, e_hi = mid, e
                if target_epsilon - e <= tolerance * target_epsilon:
                    break
        return hi

    # Bracket and solve with RDP first: it is cheap at every σ, while PRV can take tens of seconds at
    # small σ. PRV is tighter than RDP in practice, so the PRV σ lies a little below the RDP one;
    # both ends of its bracket are checked rather than assumed.
    with warnings.catch_warnings():
        # RDP warns when the best order is at the edge of its range, which happens while probing
        # σ far from the answer; the final answer is checked against the same accountant anyway.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        found, sigma = bracket("rdp", 1.0, 2.0)
        if found is not None:
            sigma = search("rdp", *found)
        if accountant == "rdp":
            return sigma
        found, sigma = bracket(accountant, sigma, 1.15)
        return sigma if found is None else search(accountant, *found)


# --------------------------------------------------------------------------------------------------
# Local DP-SGD
# --------------------------------------------------------------------------------------------------


@dataclass
class PrivateTrainResult:
    mean_loss: float  # mean over the non-empty steps of the batch-mean loss (nan if every batch was empty)
    accountant_state: dict  # Opacus accountant state_dict() after this call: pass it to the next call
    epsilon: float  # ε of the whole history so far, for the ``delta`` given
    history: History  # the accountant's (merged) history [(σ, q, steps), ...]
    steps: int  # DP-SGD steps taken in this call (empty Poisson batches included)
    empty_steps: int = 0  # how many of them had an empty Poisson batch (noise-only steps)


class _ExpandedWeightsCaller:
    """``grad_sample_mode="ew"``: calls the model through torch's ExpandedWeights, which fill
    ``p.grad_sample``. Opacus' GradSampleModuleExpandedWeights needs the batch as the first positional
    argument; HF models are called with keywords, so the batch size is passed explicitly here."""

    def __init__(self, model: nn.Module):
        self._model = model

    def __call__(self, *args, **kwargs):
        from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        if not tensors:
            raise ValueError("grad_sample_mode='ew' needs at least one batch tensor argument")
        return call_for_per_sample_grads(self._model, batch_size=int(tensors[0].shape[0]),
                                         loss_reduction="mean")(*args, **kwargs)

    def __getattr__(self, name):  # loss functions may read e.g. model.config
        if name == "_model":  # not set yet (copy / unpickle): no recursion
            raise AttributeError(name)
        return getattr(self._model, name)


def _reject_batch_dependent_layers(model: nn.Module) -> None:
    """BatchNorm in train mode mixes the examples of a batch: per-sample gradients, and with them the
    clipping bound, would be wrong even if the layer is frozen."""
    bad = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bad:
        raise ValueError(f"DP-SGD cannot train a model with BatchNorm layers: {bad[:5]}")


def private_train(model: nn.Module, dataset, collate_fn: Callable[[list], dict], *, steps: int, batch_size: int,
                  lr: float, weight_decay: float, noise_multiplier: float, max_grad_norm: float,
                  accountant_state: dict | None = None, accountant: str = "prv", grad_sample_mode: str = "hooks",
                  loss_fn: LossFn, seed: int | None, delta: float, progress: bool = False,
                  history: Iterable[Sequence] | None = None) -> PrivateTrainResult:
    """``steps`` DP-SGD steps (AdamW on the parameters with ``requires_grad``) with Poisson sampling.

    - Sampling: each step includes every example independently with probability q = batch_size / n
      (what Opacus' DPDataLoader does; done here directly because DPDataLoader cannot build the empty
      first batch of a dict dataset, and because an empty batch has to skip the forward anyway).
    - Per-sample gradients: Opacus ``GradSampleHooks`` attached to ``model`` itself (``"hooks"``, or
      ``"functorch"`` to force functorch), or torch's expanded weights (``"ew"``). ``DPOptimizer`` clips
      each to ``max_grad_norm`` and adds N(0, σ²C²) to the sum, then divides by the expected batch size.
    - Empty batch: no forward (HF models cannot run batch size 0); zero-length per-sample gradients make
      ``DPOptimizer`` take a noise-only step, and the accountant counts it like any other.
    - Accounting: restored from ``accountant_state`` (Opacus ``state_dict()``; None: fresh), one step per
      DP-SGD step. ``history`` is an alternative to ``accountant_state`` (a bare history list).
    - Afterwards the model is a plain module again: hooks removed, no Opacus attributes left on the
      parameters, trainable parameters the same tensor objects (now holding the trained values), their
      ``.grad`` the last privatized gradient (post-processing of DP output, so safe to keep), and the
      train/eval mode as it was.
    - ``seed``: Poisson sampling and noise. None draws it from the OS; see the module note on seeds.
    """
    from opacus.grad_sample import GradSampleHooks
    from opacus.optimizers import DPOptimizer
    from tqdm.auto import tqdm

    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"unknown grad_sample_mode {grad_sample_mode!r}; use one of {GRAD_SAMPLE_MODES} "
                         "(ghost clipping does not pay for r×r adapters, see NOTES-opacus.md)")
    if accountant_state is not None and history is not None:
        raise ValueError("pass accountant_state or history, not both")
    if steps < 0 or batch_size < 1 or max_grad_norm <= 0 or noise_multiplier < 0:
        raise ValueError(f"invalid DP-SGD settings: steps={steps}, batch_size={batch_size}, "
                         f"max_grad_norm={max_grad_norm}, noise_multiplier={noise_multiplier}")
    n = len(dataset)
    if n == 0:
        raise ValueError("the local dataset is empty")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    _reject_batch_dependent_layers(model)

    acc = (make_accountant(accountant, history) if history is not None
           else accountant_from_state(accountant_state, accountant))
    q = min(1.0, batch_size / n)
    gen = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else int(seed))
    # The mean over the expected batch (Opacus' choice for Poisson batches): with q = 1 and no noise or
    # clipping this is exactly the plain mean gradient.
    opt = DPOptimizer(torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay),
                      noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                      expected_batch_size=max(1, round(q * n)), loss_reduction="mean", generator=gen)
    was_training = model.training
    hooks = None
    losses: list[float] = []
    empty = 0
    with warnings.catch_warnings():
        # Opacus' full backward hooks sit on modules whose inputs need no grad (frozen layers below R);
        # torch warns that they fire on output gradients, which is all Opacus uses.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        try:
            if grad_sample_mode == "ew":
                caller = _ExpandedWeightsCaller(model)
            else:
                # Attached to the model itself (no wrapper): the loss function gets the caller's model.
                # strict: refuse trainable modules with buffers, whose per-sample gradients Opacus cannot do.
                hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean", strict=True,
                                        force_functorch=grad_sample_mode == "functorch")
                caller = model
            model.train()  # Opacus' hooks only record in training mode
            for _ in tqdm(range(steps), desc="DP-SGD steps", leave=False, disable=not progress, mininterval=1.0):
                idx = torch.nonzero(torch.rand(n, generator=gen) < q).flatten().tolist()  # Poisson sampling
                opt.zero_grad(set_to_none=True)
                if idx:
                    batch = collate_fn([dataset[i] for i in idx])
                    loss = loss_fn(caller, batch).mean()
                    loss.backward()
                    losses.append(float(loss.detach()))
                    missing = [i for i, p in enumerate(params) if getattr(p, "grad_sample", None) is None]
                    if missing:
                        raise RuntimeError(f"{len(missing)} trainable parameters got no per-sample gradient "
                                           "(unused in the forward pass?): freeze them or use them")
                else:
                    empty += 1
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                opt.step()
                acc.step(noise_multiplier=noise_multiplier, sample_rate=q)
        finally:
            if hooks is not None:
                hooks.cleanup()  # removes the hooks and grad_sample / _forward_counter / ... from the params
            for p in params:
                for attr in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample", "_norm_sample"):
                    if hasattr(p, attr):
                        delattr(p, attr)
            model.train(was_training)

    hist = merge_history(acc.history)
    acc.history = hist
    eps = epsilon_from_history(hist, delta, accountant)
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    log.info("DP-SGD: %d steps (%d empty batches), q=%.4g, sigma=%.4g, C=%.4g, epsilon=%.4g at delta=%.3g",
             steps, empty, q, noise_multiplier, max_grad_norm, eps, delta)
    return PrivateTrainResult(mean_loss=mean_loss, accountant_state=acc.state_dict(), epsilon=eps,
                              history=hist, steps=steps, empty_steps=empty)


# --------------------------------------------------------------------------------------------------
# Private initialization gradient
# --------------------------------------------------------------------------------------------------


class _NeedsLoop(Exception):
    """The vectorised path cannot vouch for its per-sample norms on this model/batch."""


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        return False
    return isinstance(module, Conv1D)


def _batch_size(batch: Mapping) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("a batch needs at least one tensor with a batch dimension")


def _ghost_owners(model: nn.Module, params: Mapping[str, nn.Parameter]) -> dict[str, tuple[nn.Module, str]] | None:
    """{param name: (owning Linear/Conv1D module, "weight" | "bias")}, or None if some named parameter is
    not such a weight or bias, or is shared with another module (tied weights: its gradient would have
    contributions the layer's own activations do not show)."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    owners = {}
    for name, p in params.items():
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        if not (isinstance(mod, nn.Linear) or _is_conv1d(mod)) or attr not in ("weight", "bias") or uses[id(p)] > 1:
            return None
        owners[name] = (mod, attr)
    return owners


def _per_sample_weight_sq_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖Σ_t g_t a_tᵀ‖²_F per sample for a (B,T,in), g (B,T,out): the weight gradient of a linear layer.

    Ghost norm Σ_{t,t'} (a_t·a_t')(g_t·g_t') costs B·T²·(in+out) and B·T² memory; the explicit per-sample
    gradient costs B·T·in·out and B·in·out memory. Take the cheaper (the explicit one in chunks)."""
    B, T, n_in = a.shape
    n_out = g.shape[-1]
    if T * (n_in + n_out) <= n_in * n_out:
        return ((a @ a.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum(dim=(1, 2))
    chunk = max(1, (16 * 2**20) // (n_in * n_out))  # ≤ 64 MB of float32 per chunk
    return torch.cat([torch.einsum("bto,bti->boi", g[i:i + chunk], a[i:i + chunk]).pow(2).sum(dim=(1, 2))
                      for i in range(0, B, chunk)])


def _ghost_clipped_sum(model: nn.Module, batch: dict, params: Mapping[str, nn.Parameter],
                       owners: Mapping[str, tuple[nn.Module, str]], max_grad_norm: float,
                       loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """Σ_i clip(∂ℓ_i/∂θ) over one batch with one forward and one backward pass.

    A linear layer's per-sample weight gradient is Σ_t g_t a_tᵀ (a: its input, g: the gradient at its
    output), so per-sample norms and the clipped sum Σ_i c_i Σ_t g_{i,t} a_{i,t}ᵀ follow from (a, g)
    without materialising B copies of every weight (10M numbers per example on MiniLM).
    Safety check: with all c_i = 1 that reconstruction must equal autograd's gradient of the summed
    loss; if it does not (a weight used elsewhere too, a layer not called batch-first, ...), the
    per-sample norms cannot be trusted and the caller falls back to the per-example loop.
    """
    modules = {id(m): m for m, _ in owners.values()}
    captured: dict[int, list] = {k: [] for k in modules}

    def hook(mod, inputs, output):
        captured[id(mod)].append((inputs[0], output))

    handles = [m.register_forward_hook(hook) for m in modules.values()]
    try:
        losses = loss_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    B = int(losses.shape[0])
    if any(len(c) != 1 for c in captured.values()):
        raise _NeedsLoop("a target layer ran more or less than once in the forward pass")
    keys = list(modules)
    outputs = [captured[k][0][1] for k in keys]
    names = list(params)
    grads = torch.autograd.grad(losses.sum(), outputs + [params[n] for n in names], allow_unused=True)
    g_out = dict(zip(keys, grads[: len(keys)]))
    full = dict(zip(names, grads[len(keys):]))

    acts = {}
    sq = torch.zeros(B, dtype=torch.float32)
    for k in keys:
        a, g = captured[k][0][0], g_out[k]
        if g is None:  # the layer's output does not reach the loss: no gradient
            acts[k] = None
            continue
        if a.shape[0] != B or g.shape[0] != B:
            raise _NeedsLoop("a target layer's input is not batch-first")
        a3 = a.detach().reshape(B, -1, a.shape[-1]).float()
        g3 = g.detach().reshape(B, -1, g.shape[-1]).float()
        acts[k] = (a3, g3)
        for name, (mod, attr) in owners.items():
            if id(mod) != k:
                continue
            sq += _per_sample_weight_sq_norms(a3, g3) if attr == "weight" else g3.sum(1).pow(2).sum(1)
    factors = (max_grad_norm / (sq.sqrt() + _CLIP_EPS)).clamp(max=1.0)

    out = {}
    for name, (mod, attr) in owners.items():
        p = params[name]
        if acts[id(mod)] is None:
            rebuilt_full = clipped = torch.zeros(p.shape, dtype=torch.float32)
        else:
            a3, g3 = acts[id(mod)]
            gc = g3 * factors[:, None, None]
            if attr == "bias":
                rebuilt_full, clipped = g3.sum((0, 1)), gc.sum((0, 1))
            elif isinstance(mod, nn.Linear):  # weight out×in
                rebuilt_full = torch.einsum("bto,bti->oi", g3, a3)
                clipped = torch.einsum("bto,bti->oi", gc, a3)
            else:  # Conv1D weight in×out
                rebuilt_full = torch.einsum("bti,bto->io", a3, g3)
                clipped = torch.einsum("bti,bto->io", a3, gc)
        ref = torch.zeros(p.shape, dtype=torch.float32) if full[name] is None else full[name].float()
        tol = 1e-4 if p.dtype in (torch.float32, torch.float64) else 2e-2
        if float((rebuilt_full - ref).norm()) > tol * float(ref.norm()) + 1e-7:
            raise _NeedsLoop(f"{name}: its gradient is not explained by its layer's own inputs and outputs")
        out[name] = clipped
    return out


def _loop_clipped_sum(model: nn.Module, batch: dict, params: Mapping[str, nn.Parameter], max_grad_norm: float,
                      loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """Σ_i clip(∂ℓ_i/∂θ), one forward/backward per example: works for any parameter and model."""
    names = list(params)
    out = {n: torch.zeros(params[n].shape, dtype=torch.float32) for n in names}
    B = _batch_size(batch)
    for i in range(B):
        one = {k: v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B else v
               for k, v in batch.items()}
        grads = torch.autograd.grad(loss_fn(model, one).sum(), [params[n] for n in names], allow_unused=True)
        grads = [torch.zeros(params[n].shape) if g is None else g.float() for n, g in zip(names, grads)]
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        factor = min(1.0, max_grad_norm / (norm + _CLIP_EPS))
        for n, g in zip(names, grads):
            out[n] += factor * g
    return out


def private_gradient_sum(model: nn.Module, batches, _legacy_batches=None, /, *,
                         param_names: list[str] | None = None, max_grad_norm: float, noise_multiplier: float,
                         loss_fn: LossFn, generator: torch.Generator,
                         method: str = "auto") -> tuple[dict[str, torch.Tensor], int]:
    """Σ_i clip_C(∂ℓ_i/∂θ) + N(0, σ²C²) per coordinate, over every example of ``batches``.

    ``param_names`` are parameter names such as ``bert.encoder.layer.0.attention.self.query.weight``
    (frozen weights: they require grad only during this call). Each example's gradient is clipped
    jointly over all of them, so adding or removing one example moves the sum by at most C, and the
    noise makes the release one Gaussian-mechanism step with multiplier σ (see ``init_history_entry``).
    Returns ({name: float32 tensor shaped like the parameter}, number of examples). The model runs in
    eval mode (no dropout, as the non-private init gradient), its mode is restored afterwards, and no
    ``.grad`` of any parameter is touched.

    How the per-example gradients are found (``method``):
    - ``"ghost"``: for weights and biases of ``nn.Linear`` / ``Conv1D`` layers, one batched forward and
      backward: per-example norms from each layer's inputs and output gradients (ghost norms), clipped
      sum as one weighted product per layer. Memory stays that of a normal backward pass; per-example
      gradients of all targets at once (vmap, Opacus GradSampleModule) would need B × 10M numbers on
      MiniLM's 36 layers. Checked against autograd's unclipped gradient; falls back to the loop if that
      check fails (shared weights, non-batch-first layers). Needs per-example losses that depend on
      their own example only (eval-mode transformers: yes).
    - ``"loop"``: one forward/backward per example; any parameter, any model, ~B times slower.
    - ``"auto"`` (default): ghost where it applies, else the loop.

    ``generator`` drives the noise: it must not be predictable by the server (module note on seeds).

    Deprecated call form ``private_gradient_sum(model, layer_names, batches, ...)`` (still used by
    ``client/dp.py``): ``layer_names`` are module names, the result is keyed by them and shaped m×n
    (Conv1D weights transposed), as ``fedsb.init.accumulate_gradients`` returns.
    """
    if _legacy_batches is not None:
        if param_names is not None:
            raise ValueError("give param_names or the legacy (layer_names, batches) positionals, not both")
        layer_names = list(batches)
        sums, count = private_gradient_sum(model, _legacy_batches, param_names=[f"{n}.weight" for n in layer_names],
                                           max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                                           loss_fn=loss_fn, generator=generator, method=method)
        out = {}
        for n in layer_names:
            g = sums[f"{n}.weight"]
            out[n] = g if isinstance(model.get_submodule(n), nn.Linear) else g.t()
        return out, count

    if param_names is None:
        raise TypeError("private_gradient_sum needs param_names")
    if method not in ("auto", "ghost", "loop"):
        raise ValueError(f"unknown method {method!r}; use 'auto', 'ghost' or 'loop'")
    if max_grad_norm <= 0 or noise_multiplier < 0:
        raise ValueError(f"need max_grad_norm > 0 and noise_multiplier >= 0, got {max_grad_norm}, {noise_multiplier}")
    all_params = dict(model.named_parameters())
    unknown = [n for n in param_names if n not in all_params]
    if unknown:
        raise KeyError(f"no such parameters: {unknown[:5]}")
    params = {n: all_params[n] for n in param_names}
    owners = _ghost_owners(model, params) if method != "loop" else None
    if method == "ghost" and owners is None:
        raise ValueError("method='ghost' needs unshared weights/biases of nn.Linear or Conv1D layers")

    sums = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
    count = 0
    was_training = model.training
    was_req = {n: p.requires_grad for n, p in params.items()}
    model.eval()
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in batches:
            size = _batch_size(batch)
            if size == 0:
                continue
            part = None
            if owners is not None:
                try:
                    part = _ghost_clipped_sum(model, batch, params, owners, max_grad_norm, loss_fn)
                except _NeedsLoop as e:
                    if method == "ghost":
                        raise ValueError(f"method='ghost' does not apply to this model: {e}") from e
                    log.warning("private init gradient: per-example loop instead of ghost norms (%s)", e)
                    owners = None  # the same model will fail the same way on the next batch
            if part is None:
                part = _loop_clipped_sum(model, batch, params, max_grad_norm, loss_fn)
            for n in sums:
                sums[n] += part[n]
            count += size
    finally:
        for n, p in params.items():
            p.requires_grad_(was_req[n])
        model.train(was_training)

    std = noise_multiplier * max_grad_norm
    if std > 0:
        for n in sums:
            sums[n] += torch.normal(0.0, std, size=sums[n].shape, generator=generator)
    return sums, count
