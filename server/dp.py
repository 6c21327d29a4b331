"""Differential privacy on the server: bookkeeping only (the clients clip and noise; see fedsb.privacy).

``DPAccounting`` wraps every phase that reaches the clients (init, train rounds, SecAgg+ rounds) as a
round hook: it adds δ and the node's accountant history to each message, records the history each reply
reports (so a restarted node's budget continues, never restarts from zero), and reports ε per round and
in the summary.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from fedsb.config import FedSBConfig
from fedsb.privacy.dp import default_delta, epsilon_from_history
from fedsb.run.state import RunState


class RoundHook:
    """What wraps the phases of a run, as Flower wraps a strategy: per-node config, each reply's metrics
    seen, metrics added to each round's record and to the summary. The default does nothing."""

    def node_config(self, node: int) -> dict[str, Any]:
        return {}

    def observe(self, node: int, metrics: Mapping[str, Any]) -> None:
        pass

    def round_metrics(self) -> dict[str, Any]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}


class DPAccounting(RoundHook):
    def __init__(self, cfg: FedSBConfig, state: RunState, examples_of: Callable[[], dict[int, int]]):
        self.cfg, self.state, self.examples_of = cfg, state, examples_of

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

    def summary(self) -> dict[str, Any]:
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
