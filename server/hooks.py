"""What wraps every phase that reaches the clients (the init query, train and evaluate rounds, SecAgg+
rounds): per-node config entries, each reply's metrics seen, entries added to each round's metrics row
and to the summary. A wrapper strategy (``server.dp.DPAccounting``) registers itself here on the
``FedSB`` it wraps, so that phases the wrapper's own hooks never see (the init query inside the first
``configure_train``) carry its config too.
"""

from __future__ import annotations

from typing import Any, Mapping

from flwr.app import Message


class PhaseHook:
    """The default does nothing."""

    def node_config(self, node: int) -> dict[str, Any]:
        return {}

    def observe(self, node: int, metrics: Mapping[str, Any]) -> None:
        pass

    def round_metrics(self) -> dict[str, Any]:
        return {}

    def summary_entries(self) -> dict[str, Any]:
        return {}


class PhaseHooks:
    def __init__(self) -> None:
        self.hooks: list[PhaseHook] = []

    def add(self, hook: PhaseHook) -> None:
        self.hooks.append(hook)

    def config(self, node: int) -> dict[str, Any]:
        return {k: v for h in self.hooks for k, v in h.node_config(node).items()}

    def observe_metrics(self, node: int, metrics: Mapping[str, Any]) -> None:
        for h in self.hooks:
            h.observe(node, metrics)

    def observe(self, node: int, reply: Message) -> None:
        metrics = reply.content.metric_records.get("metrics")
        if metrics is not None:
            self.observe_metrics(node, metrics)

    def metrics(self) -> dict[str, Any]:
        return {k: v for h in self.hooks for k, v in h.round_metrics().items()}

    def summary(self) -> dict[str, Any]:
        return {k: v for h in self.hooks for k, v in h.summary_entries().items()}
