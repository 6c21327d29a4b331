"""Local training: AdamW steps on whatever is trainable (the same code for every method and task)."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict], torch.Tensor]


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def _cycle(loader: DataLoader):
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("the local dataset is empty")


def scheduled_lrs(lr: float, schedule: str, warmup_ratio: float, rnd: int, rounds: int, steps: int) -> list[float]:
    """The learning rate of each of the ``steps`` local steps of round ``rnd`` (1-based) of ``rounds``.

    ``linear`` is transformers' ``get_linear_schedule_with_warmup`` laid over all rounds' local steps:
    every client of a round uses the same rates (the schedule follows the global round, so a client that
    skipped rounds does not restart its warm-up). Written out rather than built as a LambdaLR because the
    optimizer is fresh every round and the schedule's position comes from the server's round number.
    """
    if schedule == "constant":
        return [lr] * steps
    total = rounds * steps
    warm = int(warmup_ratio * total)
    out = []
    for k in range(steps):
        g = min((rnd - 1) * steps + k, total)  # (num-server-rounds cannot change on resume under a schedule)
        f = g / max(1, warm) if g < warm else max(0.0, (total - g) / max(1, total - warm))
        out.append(lr * f)
    return out


def train_steps(
    model: nn.Module,
    loader: DataLoader,
    steps: int,
    lr: float | Sequence[float],
    loss_fn: LossFn,
    weight_decay: float = 0.0,
    desc: str = "local steps",
    progress: bool = True,
) -> float:
    """``steps`` AdamW steps on the trainable parameters; returns the mean training loss. ``lr`` is one rate,
    or one per step (``scheduled_lrs``).

    A fresh optimizer each round: clients are stateless between rounds (FedAvg convention), and the
    server only ever sends the averaged weights.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    lrs = step_lrs(lr, steps)
    opt = torch.optim.AdamW(params, lr=lrs[0], weight_decay=weight_decay)
    model.train()
    total, it = 0.0, _cycle(loader)
    bar = tqdm(range(steps), desc=desc, leave=False, disable=not progress, mininterval=1.0)
    for k in bar:
        batch = next(it)
        loss = loss_fn(model, batch).mean()
        for group in opt.param_groups:
            group["lr"] = lrs[k]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach())
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
    model.eval()
    return total / steps


def step_lrs(lr: float | Sequence[float], steps: int) -> list[float]:
    """One rate per step, from one rate or a list of them (which must have one per step)."""
    if isinstance(lr, (int, float)):
        return [float(lr)] * steps
    lrs = [float(x) for x in lr]
    if len(lrs) != steps:
        raise ValueError(f"got {len(lrs)} learning rates for {steps} steps")
    return lrs


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes(device: str) -> int:
    """Peak memory of this process: allocated CUDA memory since the last reset on a GPU; on the CPU the
    process's resident high-water mark (a whole-process figure: it never goes down within a process)."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kilobytes on Linux
