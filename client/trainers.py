"""How a client computes its init gradient and trains locally: plain, or with DP-SGD (``client.dp``).

Chosen once from the config (``client.handlers.trainer_for``); the handlers never ask whether DP is on.
"""

from __future__ import annotations

import torch

from fedsb.adapters.sb_init import accumulate_gradients
from fedsb.config import FedSBConfig
from fedsb.logs import progress_bars
from fedsb.methods import NodeStore
from fedsb.tasks import Task
from fedsb.tasks.training import scheduled_lrs, train_steps


def client_seed(cfg: FedSBConfig, pid: int, rnd: int) -> int:
    return (cfg.seed * 1_000_003 + pid * 7919 + rnd) % (2**31)


class LocalTrainer:
    """Plain local work. ``config`` is the message's config; ``store`` the node's own state."""

    private = False

    def __init__(self, cfg: FedSBConfig):
        self.cfg = cfg

    def init_gradient(self, task: Task, model, layers: list[str], ds, pid: int, config, store: NodeStore):
        """Sum of ∂L/∂W0 over up to init-samples local examples: (sums, count, metrics)."""
        g = torch.Generator().manual_seed(client_seed(self.cfg, pid, 0))
        idx = torch.randperm(len(ds), generator=g)[: self.cfg.init_samples].numpy()
        sums, count = accumulate_gradients(model, layers, task.loader(ds.subset(idx), shuffle=False), task.loss_fn)
        return sums, count, {}

    def train(self, task: Task, model, ds, pid: int, rnd: int, config, store: NodeStore):
        """``local-steps`` steps: (mean loss, metrics), or (None, metrics) when the node must not train."""
        cfg, seed = self.cfg, client_seed(self.cfg, pid, rnd)
        torch.manual_seed(seed)
        loader = task.loader(ds, shuffle=True, seed=seed)
        lrs = scheduled_lrs(cfg.learning_rate, cfg.lr_schedule, cfg.warmup_ratio, rnd, cfg.num_server_rounds, cfg.local_steps)
        loss = train_steps(model, loader, cfg.local_steps, lrs, task.loss_fn, cfg.weight_decay,
                           desc=f"partition {pid} round {rnd}", progress=progress_bars())
        return loss, {}


__all__ = ["LocalTrainer", "client_seed"]
