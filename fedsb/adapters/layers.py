"""The adapter layers: ``SBLinear`` (LoRA-SB: only the r×r R trains) and ``LoRALinear`` (the baselines).

``SBLinear`` computes ``y = base(x) + s · x·Aᵀ·Rᵀ·Bᵀ`` with B (m×r) and A (r×n) frozen; ``LoRALinear``
``y = base(x) + (α/r) · x·Aᵀ·Bᵀ``. Both wrap an ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2), own
their adapter weights, and merge into / unmerge from the base weight, as PEFT's LoRA layer does.

Trainable matrices are child ``nn.Linear`` modules (``sb_R``, ``lora_A``, ``lora_B``): Opacus has a
per-sample gradient rule for ``nn.Linear``, so DP-SGD needs no functorch fallback.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D  # GPT-2 style layers store the weight transposed (in × out)

log = logging.getLogger(__name__)

def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features m, in_features n) of an nn.Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    n, m = module.weight.shape  # Conv1D weight is (in, out)
    return m, n


def weight_as_mn(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The weight (or a tensor shaped like it, e.g. its gradient) as an m×n matrix."""
    w = module.weight if weight is None else weight
    return w if isinstance(module, nn.Linear) else w.t()


def adapter_dtype(base: torch.dtype) -> torch.dtype:
    """Adapters train in at least float32 whatever the base: a bfloat16/float16 base keeps float32 R, A, B
    (their input is upcast, their output cast back to the base's dtype); a float64 base stays float64.
    No autocast is involved, so R's gradient and the optimizer state are float32 on CPU and GPU alike."""
    return torch.promote_types(base, torch.float32)


class _AdapterBase(nn.Module):
    """Shared wrapper logic: frozen base layer, merge / unmerge of ``delta_weight``."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not is_linear(base_layer):
            raise TypeError(f"expected nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.out_features, self.in_features = linear_shape(base_layer)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:  # m × n
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + self.adapter_forward(x).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the adapter into the base weight (inference without adapter cost)."""
        if self.merged:
            return
        d = self.delta_weight().to(self.base_layer.weight.dtype)
        self.base_layer.weight += d if isinstance(self.base_layer, nn.Linear) else d.t()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        d = self.delta_weight().to(self.base_layer.weight.dtype)
        self.base_layer.weight -= d if isinstance(self.base_layer, nn.Linear) else d.t()
        self.merged = False


class SBLinear(_AdapterBase):
    """LoRA-SB: ``W = W0 + s·B·R·A``, B and A fixed, R (r×r) trainable.

    ``sb_B`` (m×r) and ``sb_A`` (r×n) are frozen parameters; ``sb_R`` is an ``nn.Linear(r, r)`` whose
    weight is R, so ``x → sb_R(x·Aᵀ) = x·Aᵀ·Rᵀ`` and the adapter output is ``s·x·Aᵀ·Rᵀ·Bᵀ``.
    """

    def __init__(self, base_layer: nn.Module, rank: int, scale: float = 1.0):
        super().__init__(base_layer)
        m, n = self.out_features, self.in_features
        if rank > min(m, n):
            raise ValueError(f"rank {rank} exceeds min(out, in) = min({m}, {n}) of this layer")
        w = base_layer.weight
        self.rank, self.scale = rank, float(scale)
        dt = adapter_dtype(w.dtype)
        self.sb_B = nn.Parameter(torch.zeros(m, rank, dtype=dt, device=w.device), requires_grad=False)
        self.sb_A = nn.Parameter(torch.zeros(rank, n, dtype=dt, device=w.device), requires_grad=False)
        self.sb_R = nn.Linear(rank, rank, bias=False, dtype=dt, device=w.device)
        nn.init.zeros_(self.sb_R.weight)

    @torch.no_grad()
    def set_basis(self, B: torch.Tensor, A: torch.Tensor, R: torch.Tensor | None = None) -> None:
        self.sb_B.copy_(B)
        self.sb_A.copy_(A)
        if R is not None:
            self.sb_R.weight.copy_(R)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.sb_B @ self.sb_R.weight @ self.sb_A

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.sb_A.dtype)
        return self.scale * F.linear(self.sb_R(F.linear(x, self.sb_A)), self.sb_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self._can_fuse(x):
            return super().forward(x)
        w0 = weight_as_mn(self.base_layer)
        return _SBFused.apply(x, w0, self.base_layer.bias, self.sb_B, self.sb_R.weight, self.sb_A, self.scale)

    def _can_fuse(self, x: torch.Tensor) -> bool:
        """Whether the one-matmul path (``_SBFused``) may replace base + adapter for this input.

        Only when nothing needs the modules to be called: a hook on ``sb_R`` (Opacus' per-sample
        gradients, a user's hook) or on the base layer must see its own forward, so those keep the
        plain path. Only frozen base, B and A (their gradients are not computed), one dtype, and only
        when building ``W0 + s·B·R·A`` (m·n·r) costs less than the two thin matmuls it saves
        (tokens·r·(m+n)), i.e. not for a handful of tokens (generation).
        """
        R, base = self.sb_R, self.base_layer
        if R._forward_hooks or R._forward_pre_hooks or R._backward_hooks or base._forward_hooks or base._forward_pre_hooks:
            return False
        w = base.weight
        if w.requires_grad or self.sb_B.requires_grad or self.sb_A.requires_grad:
            return False
        if base.bias is not None and base.bias.requires_grad:
            return False
        if not (x.dtype == w.dtype == self.sb_A.dtype == R.weight.dtype):
            return False
        m, n = self.out_features, self.in_features
        tokens = x.numel() // n
        return tokens * (m + n) >= m * n


class _SBFused(torch.autograd.Function):
    """``y = x·(W0 + s·B·R·A)ᵀ + b`` in one matmul, with a hand-written backward that gives R only its
    r×r gradient ``s·(dy·B)ᵀ·(x·Aᵀ)``.

    Written by hand because autograd through ``F.linear(x, W0 + s·B·R·A)`` would form the dense m×n
    weight gradient ``dyᵀ·x`` (a full extra matmul) before projecting it to r×r; and the unfused path
    pays two thin matmuls in the forward and three in the backward, plus an elementwise add, per layer.
    Saved for backward: ``x·Aᵀ`` (tokens×r), not x, and not the effective weight either: it is rebuilt
    in the backward (m·n·r, cheaper than the tokens·r·n of the unfused path) so that activation memory
    does not hold a second copy of every adapted weight.
    """

    @staticmethod
    def forward(ctx, x, w0, bias, B, R, A, scale):
        y = F.linear(x, torch.addmm(w0, B @ R, A, alpha=scale), bias)  # W0 + s·(B·R)·A
        xa = F.linear(x, A) if ctx.needs_input_grad[4] else None
        ctx.save_for_backward(xa, w0, B, R, A)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        xa, w0, B, R, A = ctx.saved_tensors
        dx = dR = None
        if ctx.needs_input_grad[0]:
            dx = dy @ torch.addmm(w0, B @ R, A, alpha=ctx.scale)
        if ctx.needs_input_grad[4]:
            dR = ctx.scale * (dy.reshape(-1, dy.shape[-1]) @ B).t() @ xa.reshape(-1, xa.shape[-1])
        return dx, None, None, None, dR, None, None


class LoRALinear(_AdapterBase):
    """Standard LoRA (the baselines): ``W = W0 + (α/r)·B·A`` with A (r×n), B (m×r).

    Kaiming-uniform A and zero B, as in the LoRA paper and PEFT. ``train_a=False`` freezes A (FFA-LoRA).
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, train_a: bool = True):
        super().__init__(base_layer)
        m, n = self.out_features, self.in_features
        w = base_layer.weight
        self.rank, self.scale = rank, float(alpha) / rank
        self.lora_A = nn.Linear(n, rank, bias=False, dtype=adapter_dtype(w.dtype), device=w.device)
        self.lora_B = nn.Linear(rank, m, bias=False, dtype=adapter_dtype(w.dtype), device=w.device)
        self.reset_lora(train_a=train_a)

    @torch.no_grad()
    def reset_lora(self, train_a: bool = True) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.weight.requires_grad_(train_a)
        self.lora_B.weight.requires_grad_(True)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.lora_B.weight @ self.lora_A.weight

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        return self.scale * self.lora_B(self.lora_A(x))


