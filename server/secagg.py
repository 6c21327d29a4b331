"""A round under SecAgg+ (Flower's legacy ``SecAggPlusWorkflow``): the server learns only the weighted
mean of the clients' flat R (+ head) vectors, never one client's vector.

``SecAggFedSB`` is ``FedSB`` with another way of gathering and summing the replies; the sampling,
the basis, the config, the phase hooks (DP accounting) and the metrics row are the same.

Flower's SecAgg+ lives in the legacy stack, so this wraps one round in a ``LegacyContext`` whose
strategy samples exactly the nodes the fedsb server chose. Weighting survives natively: each client
uploads ``[w, w·x]`` masked (``w = num_examples / max_weight``, quantized), and the workflow divides the
secure sum by the securely summed weights. The basis travels beforehand in a plain (Message API)
query, since the SecAgg+ messages carry only FitIns.

Quantization error: values are clipped to ±c and stochastically rounded to a grid of step
Δ = 2c / Q (Q = ``secagg-quantization-range``); each client's rounding error is below Δ per coordinate,
so the mean carries at most k·Δ / Σ_i w_i of it (``quantization_error_bound``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedsb.aggregation import robust
from fedsb.config import FedSBConfig
from fedsb.wire import from_legacy_scalars, to_legacy_scalars
from server.strategy import FedSB, scalar_metrics

log = logging.getLogger("fedsb.server.secagg")


def quantization_error_bound(num_clients: int, weights: list[float], max_weight: float, clip: float, q_range: int,
                             max_abs: float) -> float:
    """Worst-case |secure mean − plain weighted mean| per coordinate, for values within ±clip.

    Rounding: < k·(2c/Q) / Σ r_i with r_i = w_i / max_weight. Weight quantization: each r_i is rounded
    to a multiple of 1/Q, which moves the mean by at most max|x| · 2k / (Q · Σ r_i).
    """
    ratios = [w / max_weight for w in weights]
    total = sum(ratios)
    return num_clients * (2 * clip / q_range) / total + max_abs * 2 * num_clients / (q_range * total)


@dataclass
class SecAggResult:
    aggregate: np.ndarray | None
    sampled: int
    results: int
    failures: int
    train_loss: float | None
    fingerprints: set[str]
    saw_only_aggregate: bool | None  # every vector the (legacy) aggregation received was the secure mean


def secagg_round(grid, cfg: FedSBConfig, rnd: int, nodes: list[int], global_vec: np.ndarray,
                 config_for: Callable[[int], dict], max_weight: float,
                 on_metrics: Callable[[int, dict, int], None] = lambda node, m, n: None) -> SecAggResult:
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerConfig, SimpleClientManager
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow

    from client.flower_private import GridClientProxy
    from client.flower_private import recorddict_compat as compat

    seen: list[np.ndarray] = []
    info = {"results": 0, "failures": 0, "loss": None, "fingerprints": set()}

    class ChosenNodes(FedAvg):
        """Samples the nodes fedsb chose; records what aggregation receives (only the secure mean)."""

        def configure_fit(self, server_round, parameters, client_manager):
            proxies = client_manager.all()
            return [(proxies[str(n)], FitIns(parameters, to_legacy_scalars(config_for(n)))) for n in nodes if str(n) in proxies]

        def aggregate_fit(self, server_round, results, failures):
            info["results"], info["failures"] = len(results), len(failures)
            for proxy, res in results:
                on_metrics(int(proxy.node_id), from_legacy_scalars(res.metrics), int(res.num_examples))
                seen.append(parameters_to_ndarrays(res.parameters)[0])
                info["fingerprints"].add(str(res.metrics.get("fingerprint", "")))
            losses = [(float(r.metrics["train-loss"]), r.num_examples) for _, r in results if "train-loss" in r.metrics]
            if losses:
                info["loss"] = robust.weighted_scalar_mean(losses)
            if not results:
                return None, {}
            # every FitRes already holds the secure mean (the workflow put it there): pass it through as is
            # (FedAvg's re-averaging of identical vectors would only add rounding)
            return results[0][1].parameters, {}

    cm = SimpleClientManager()
    for n in nodes:
        cm.register(GridClientProxy(node_id=n, grid=grid, run_id=grid.run.run_id))
    state = RecordDict({
        "parameters": compat.parameters_to_arrayrecord(ndarrays_to_parameters([global_vec]), True),
        "config": ConfigRecord({"current_round": rnd}),
    })
    ctx = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=state, run_config={}),
                        config=ServerConfig(num_rounds=1), strategy=ChosenNodes(), client_manager=cm)
    workflow = SecAggPlusWorkflow(num_shares=cfg.secagg_shares, reconstruction_threshold=cfg.secagg_threshold,
                                  max_weight=max_weight, clipping_range=cfg.secagg_clip_range,
                                  quantization_range=cfg.secagg_quantization_range, timeout=cfg.round_timeout)
    workflow(grid, ctx)
    out, only = None, None
    if info["results"]:
        raw = parameters_to_ndarrays(compat.arrayrecord_to_parameters(ctx.state["parameters"], True))[0]
        only = bool(seen) and all(np.array_equal(v, raw) for v in seen)
        out = raw.astype(np.float32)
    return SecAggResult(out, len(nodes), info["results"], info["failures"], info["loss"], info["fingerprints"], only)


class SecAggFedSB(FedSB):
    """``FedSB`` whose replies are gathered and summed by SecAgg+: the basis goes first, in a plain query,
    to the sampled nodes that lack it; the round's messages are the workflow's own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.resend_due: set[int] = set()  # nodes that did not deliver: the basis again before their next round

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        tally = self.begin_round(server_round, arrays, grid)
        if self.basis is not None:  # SecAgg+ messages carry only FitIns: the basis goes first, in a plain query
            lacking = [n for n in tally.sampled if n not in self.state.basis_holders]
            tally.counts["basis_resent"] = len(self.resend_due.intersection(lacking))
            self.resend_due.difference_update(lacking)

            def basis_content(node: int) -> RecordDict:
                rd = RecordDict({"config": ConfigRecord({"mode": "basis", "fingerprint": self.state.fingerprint})})
                tally.basis_bytes += self.basis.attach(node, rd)
                return rd

            def on_basis(node: int, reply: Message, up: int) -> None:
                if reply.has_error():
                    self.basis.forget([node])

            self.transport.send(lacking, MessageType.QUERY, basis_content, "basis", on_basis)
        self.round_config = config
        return []  # the SecAgg+ workflow sends the round's messages itself (aggregate_train)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        tally, cfg = self.tally, self.cfg
        delivered: set[int] = set()

        def config_for(node: int) -> dict:
            c = {**dict(self.round_config), **self.message_config(node, server_round)}
            if not c["dp-history"]:  # legacy config carries only scalars: a history only where DP has one
                del c["dp-history"]
            return c

        def on_metrics(node: int, metrics: dict, num_examples: int) -> None:
            delivered.add(node)
            self.hooks.observe_metrics(node, metrics)
            tally.weights.append(float(num_examples))
            tally.peak_memory = max(tally.peak_memory, int(metrics.get("peak-memory-bytes", 0)))
            tally.timings.append({k: float(v) for k, v in metrics.items() if k.startswith("time-") or k == "seconds"})
            if "train-loss" in metrics:
                tally.losses.append((float(metrics["train-loss"]), num_examples))

        max_weight = float(max([self.nodes.examples_of.get(n, 1) for n in tally.sampled] + [1]))
        res = secagg_round(self.transport.metered_grid(), cfg, server_round, tally.sampled, tally.global_vec,
                           config_for, max_weight, on_metrics=on_metrics)
        # A node that restarted with an empty basis cache cannot take part (it fails the round): whoever did
        # not deliver is sent the basis again before its next SecAgg+ round, as a plain round's need-basis does.
        missing = [n for n in tally.sampled if n not in delivered]
        if self.basis is not None and missing:
            self.forget_nodes(missing)
            self.resend_due.update(missing)
        problems = []
        if self.basis is not None and res.fingerprints - {self.state.fingerprint}:
            problems.append(f"basis fingerprints {sorted(res.fingerprints)} != {self.state.fingerprint}")
        if res.aggregate is not None and not np.isfinite(res.aggregate).all():
            problems.append("non-finite secure aggregate")
        updated = res.aggregate is not None and res.results >= cfg.min_train_nodes and not problems
        if updated:
            self.method.set_vector(self.model, res.aggregate)
            self.method.after_round(self.model, server_round)
        else:
            # A single bad contribution cannot be removed from a secure sum: the round is dropped whole.
            log.warning("round %d: secure aggregate not applied (%d results, %s)", server_round, res.results, problems)
        up = self.state.totals["bytes_up"] - tally.up0
        tally.up_sizes = [up / res.results] * res.results if res.results else []
        tally.counts["failed"] = res.failures
        tally.rejected = [{"node": None, "reason": "secagg", "detail": p} for p in problems]
        row = self.finish_round(updated, dropouts_recovered=(len(tally.sampled) - res.results) if updated else 0,
                                secagg=True, strategy_saw_only_aggregate=res.saw_only_aggregate)
        return (self.global_arrays() if updated else None), scalar_metrics(row)
