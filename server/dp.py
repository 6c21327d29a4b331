"""Differential privacy on the server: bookkeeping only (the clients clip and noise; see fedsb.privacy).

``DPAccounting`` wraps the strategy, and through its phase hooks every phase that reaches the clients
(init, train rounds, SecAgg+ rounds): it adds δ and the node's accountant history to each message, records the history each reply
reports (so a restarted node's budget continues, never restarts from zero), and reports ε per round and
in the summary.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from flwr.serverapp.strategy import Result, Strategy

from fedsb.privacy.dp import default_delta, epsilon_from_history
from server.hooks import PhaseHook
from server.strategy import FedSB

log = logging.getLogger("fedsb.server")


class DPAccounting(Strategy, PhaseHook):
    """Wraps a ``FedSB`` as Flower's DP wrappers do (``self.strategy``): the rounds go through it and it
    starts the run; it registers on the wrapped strategy's phase hooks so the init query carries its
    entries too."""

    streams_replies = True

    def __init__(self, strategy: FedSB):
        self.strategy = strategy
        self.cfg, self.state = strategy.cfg, strategy.state
        self.examples_of = lambda: strategy.nodes.examples_of
        strategy.hooks.add(self)

    # -- the strategy: every step is the wrapped one's (the accounting happens in its phase hooks) ------
    def configure_train(self, server_round, arrays, config, grid):
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log.info("\t├──> DP accounting: accountant=%s delta=%s", self.cfg.accountant, self.cfg.target_delta or "auto")
        self.strategy.summary()

    def start(self, grid, initial_arrays=None, num_rounds=None, timeout=None, train_config=None,
              evaluate_config=None, evaluate_fn=None, outer=None) -> Result:
        return self.strategy.start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config,
                                   evaluate_fn, outer=outer or self)

    # -- the phase hook ------------------------------------------------------------------------------
    def delta(self) -> float:
        if self.cfg.target_delta > 0:
            return self.cfg.target_delta
        examples = self.examples_of()
        return default_delta(min(examples.values()) if examples else 1)

    def node_config(self, node: int) -> dict[str, Any]:
        pid = self.state.partition_of.get(node, -1)
        return {"dp-delta": self.delta(), "dp-history": self.state.dp_history.get(pid, [])}

    def observe(self, node: int, metrics: Mapping[str, Any]) -> None:
        if "dp-history" in metrics:
            pid = self.state.partition_of.get(node, -1)
            self.state.dp_history[pid] = [float(x) for x in metrics["dp-history"]]
            self.state.dp_sigma[pid] = float(metrics["noise-multiplier"])

    def epsilons(self) -> dict[int, float]:
        d = self.delta()
        return {pid: epsilon_from_history([tuple(h[i : i + 3]) for i in range(0, len(h), 3)], d, self.cfg.accountant)
                for pid, h in self.state.dp_history.items()}

    def round_metrics(self) -> dict[str, Any]:
        eps = self.epsilons()
        return {"epsilon": max(eps.values()) if eps else 0.0, "epsilon_per_client": {str(k): v for k, v in eps.items()}}

    def summary_entries(self) -> dict[str, Any]:
        cfg, eps = self.cfg, self.epsilons()
        worst = max(eps, key=eps.get) if eps else None
        h = self.state.dp_history.get(worst, [])
        return {
            "dp": True, "epsilon": eps.get(worst), "delta": self.delta(), "accountant": cfg.accountant,
            "noise_multiplier": self.state.dp_sigma.get(worst), "max_grad_norm": cfg.max_grad_norm,
            "dp_history": [[h[i], h[i + 1], int(h[i + 2])] for i in range(0, len(h), 3)],
            "delta_rule": "target-delta" if cfg.target_delta > 0 else "1/(10 n) for the smallest client's n",
            "epsilon_per_client": {str(k): v for k, v in eps.items()},
        }


class CentralDPEpsilon(PhaseHook):
    """ε of a run wrapped in one of Flower's server-side DP wrappers (``DifferentialPrivacyServerSide*``):
    user-level, one client's whole update per round is what is protected. Flower's wrappers noise the
    aggregate but keep no accountant; this counts the train rounds and composes the Gaussian mechanism
    with Poisson-style sampling rate ``num_sampled / population`` (an upper-bound approximation for the
    fixed-size sample the rounds draw), by ``accountant``. Register it on the wrapped ``FedSB``'s hooks."""

    def __init__(self, noise_multiplier: float, num_sampled: int, population: int, delta: float,
                 accountant: str = "rdp"):
        self.noise_multiplier, self.delta, self.accountant = noise_multiplier, delta, accountant
        self.sample_rate = min(1.0, num_sampled / max(1, population))
        self.rounds = 0

    def epsilon(self) -> float:
        return epsilon_from_history([(self.noise_multiplier, self.sample_rate, self.rounds)], self.delta, self.accountant)

    def round_metrics(self) -> dict[str, Any]:  # called once per train round, as its row is built
        self.rounds += 1
        return {"epsilon": self.epsilon()}

    def summary_entries(self) -> dict[str, Any]:
        return {"central_dp": {"epsilon": self.epsilon(), "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                               "sample_rate": self.sample_rate, "rounds": self.rounds, "accountant": self.accountant}}
