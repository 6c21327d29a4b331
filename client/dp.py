"""Client DP: ``DPTrainer``, the local trainer under Opacus DP-SGD, and the node's privacy bookkeeping.

The maths is in ``fedsb.privacy.dp``; this file decides which history, σ and δ apply to a message: the
node's accountant history (its own state, or what the server echoes back after a restart), σ, budget.
A node's privacy rests on the node: it never takes a δ looser than its own bound, and it refuses a round
that would take its ε past its own cap, whatever the server asks.
"""

from __future__ import annotations

import logging

import numpy as np

from fedsb.privacy import dp as privacy
from client.node import NodeSettings
from client.trainers import LocalTrainer
from fedsb.config import FedSBConfig
from fedsb.methods import NodeStore, method_class
from fedsb.tasks.training import scheduled_lrs

log = logging.getLogger("fedsb.client.dp")

STATE_KEY = "fedsb-dp"


def _unflat(values) -> privacy.History:
    v = list(values or [])
    return [(float(v[i]), float(v[i + 1]), int(v[i + 2])) for i in range(0, len(v), 3)]


def flat(history: privacy.History) -> list[float]:
    return [float(x) for h in history for x in h]


def history(config, store: NodeStore) -> privacy.History:
    """The longer of the node's own history and the one the server kept for this partition: a node
    that lost its state (restart) must not start its privacy budget from zero."""
    own = store.get(STATE_KEY)
    mine = _unflat(own[1]["history"]) if own is not None else []
    server = _unflat(config.get("dp-history", []))
    return mine if sum(h[2] for h in mine) >= sum(h[2] for h in server) else server


def save(store: NodeStore, hist: privacy.History) -> None:
    store.put(STATE_KEY, {}, {"history": flat(hist)})


def delta(cfg: FedSBConfig, config, n_local: int, node: NodeSettings | None = None) -> float:
    """The stricter of the federation's δ (target-delta, or what the server sends) and the node's own bound
    (its node-config ``dp-delta``, else 1/(10·n_local)): a server that sends a large δ cannot make this
    node calibrate less noise."""
    own = node.dp_delta if node is not None and node.dp_delta > 0 else privacy.default_delta(n_local)
    federation = cfg.target_delta if cfg.target_delta > 0 else float(config.get("dp-delta", 0.0) or 0.0)
    if federation > own:
        log.info("dp: the federation's delta %.3g is above this node's bound %.3g; using %.3g", federation, own, own)
    return min(federation, own) if federation > 0 else own


def epsilon_cap(cfg: FedSBConfig, node: NodeSettings | None) -> tuple[float, str]:
    """(cap, its source): the run's target-epsilon, or the node's own max-epsilon where that is stricter."""
    if node is not None and 0 < node.max_epsilon < cfg.target_epsilon:
        return node.max_epsilon, "this node's max-epsilon"
    return cfg.target_epsilon, "the run's target-epsilon"


def noise_multiplier(cfg: FedSBConfig, n_local: int, d: float) -> float:
    """σ given, or calibrated so the whole horizon (init step + every round's local steps, as if this
    client were sampled every round) meets target-epsilon."""
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    phases = [(min(1.0, cfg.batch_size / n_local), cfg.num_server_rounds * cfg.local_steps)]
    if method_class(cfg.method).init_spends_privacy and cfg.init_basis == "gradient" and cfg.init_source == "clients":
        # a random or weights basis, or one from the server's own data, spends nothing of the clients' budget
        phases.insert(0, (min(1.0, cfg.init_samples / n_local), 1))
    return privacy.calibrate_noise(cfg.target_epsilon, d, phases, cfg.accountant)


def metrics(hist: privacy.History, d: float, sigma: float, cfg: FedSBConfig) -> dict:
    return {"epsilon": privacy.epsilon_from_history(hist, d, cfg.accountant), "dp-delta": d,
            "noise-multiplier": sigma, "dp-history": flat(hist)}


class DPTrainer(LocalTrainer):
    private = True

    def __init__(self, cfg: FedSBConfig, node: NodeSettings | None = None):
        super().__init__(cfg)
        self.node = node or NodeSettings()

    def init_gradient(self, task, model, layers, ds, pid, config, store):
        """The init gradient under DP: a Poisson sample (q = init-samples/n, secret) of the local examples,
        each one's gradient clipped, summed, noised. ``count`` is the expected sample size q·n, a function
        of n alone, because the drawn size would tell the server about the sample."""
        cfg, n_local = self.cfg, len(ds)
        d = delta(cfg, config, n_local, self.node)
        sigma = noise_multiplier(cfg, n_local, d)
        q = min(1.0, cfg.init_samples / n_local)
        gen = privacy.secret_generator()
        loader = task.loader(ds.subset(np.asarray(privacy.poisson_indices(n_local, q, gen), dtype=np.int64)), shuffle=False)
        sums, _ = privacy.private_gradient_sum(model, layers, loader, max_grad_norm=cfg.max_grad_norm,
                                               noise_multiplier=sigma, loss_fn=task.loss_fn, generator=gen)
        hist = privacy.merge_history(history(config, store) + [(sigma, q, 1)])
        save(store, hist)
        return sums, max(1, round(q * n_local)), metrics(hist, d, sigma, cfg)

    def train(self, task, model, ds, pid, rnd, config, store):
        """(loss, metrics), or (None, metrics) when this round would overspend the budget."""
        cfg, n = self.cfg, len(ds)
        d = delta(cfg, config, n, self.node)
        sigma = noise_multiplier(cfg, n, d)
        hist = history(config, store)
        q = min(1.0, cfg.batch_size / n)
        planned = privacy.epsilon_from_history(privacy.merge_history(hist + [(sigma, q, cfg.local_steps)]), d, cfg.accountant)
        cap, source = epsilon_cap(cfg, self.node)
        if planned > cap * (1 + 1e-6):
            reason = f"round {rnd} would reach epsilon={planned:.3f} > {source} {cap:g} (delta={d:.3g}); not training"
            log.warning("privacy budget: %s", reason)
            return None, {**metrics(hist, d, sigma, cfg), "refused": reason}
        res = privacy.private_train(model, ds, task.collate(), steps=cfg.local_steps,
                                    batch_size=cfg.batch_size,
                                    lr=scheduled_lrs(cfg.learning_rate, cfg.lr_schedule, cfg.warmup_ratio, rnd,
                                                     cfg.num_server_rounds, cfg.local_steps), weight_decay=cfg.weight_decay,
                                    noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm, history=hist,
                                    accountant=cfg.accountant, grad_sample_mode=cfg.grad_sample_mode,
                                    loss_fn=task.loss_fn, delta=d)
        save(store, res.history)
        out = metrics(res.history, d, sigma, cfg)
        out["empty-batches"] = res.empty_steps
        return res.mean_loss, out
