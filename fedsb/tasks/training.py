"""Local training: AdamW steps on whatever is trainable (the same code for every method and task)."""

from __future__ import annotations

import logging
from typing import Callable

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


def train_steps(
    model: nn.Module,
    loader: DataLoader,
    steps: int,
    lr: float,
    loss_fn: LossFn,
    weight_decay: float = 0.0,
    desc: str = "local steps",
    progress: bool = True,
) -> float:
    """``steps`` AdamW steps on the trainable parameters; returns the mean training loss.

    A fresh optimizer each round: clients are stateless between rounds (FedAvg convention), and the
    server only ever sends the averaged weights.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    total, it = 0.0, _cycle(loader)
    bar = tqdm(range(steps), desc=desc, leave=False, disable=not progress, mininterval=1.0)
    for _ in bar:
        batch = next(it)
        loss = loss_fn(model, batch).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach())
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
    model.eval()
    return total / steps


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
