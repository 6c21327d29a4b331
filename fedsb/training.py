"""Local training and evaluation (the same code for every method; only the trainable set differs)."""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict], torch.Tensor]


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def seq_cls_per_example_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Cross-entropy per example (no reduction): sums of it give sums of per-example gradients."""
    logits = model(**model_inputs(batch)).logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction="none")


def loss_fn_for(task: str) -> LossFn:
    if task == "causal-lm":
        from fedsb.causal import causal_per_example_loss

        return causal_per_example_loss
    return seq_cls_per_example_loss


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


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn: LossFn, task: str = "seq-cls") -> dict[str, float]:
    """Mean loss and (classification) accuracy over the loader."""
    model.eval()
    loss_sum, n, correct = 0.0, 0, 0
    for batch in loader:
        if task == "causal-lm":
            losses = loss_fn(model, batch)
        else:
            logits = model(**model_inputs(batch)).logits.float()
            losses = F.cross_entropy(logits, batch["labels"], reduction="none")
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
        loss_sum += float(losses.sum())
        n += int(losses.shape[0])
    if n == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "num-examples": 0}
    out = {"loss": loss_sum / n, "num-examples": n}
    if task == "causal-lm":
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    else:
        out["accuracy"] = correct / n
    return out
