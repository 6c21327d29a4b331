"""A round under SecAgg+ (Flower's legacy ``SecAggPlusWorkflow``): the server learns only the weighted
mean of the clients' flat R (+ head) vectors, never one client's vector.

``SecAggTrainRound`` is ``TrainRound`` with another way of gathering and summing the replies; the
sampling, the basis, the config, the round hooks (DP accounting) and the record are the same.

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
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedsb.aggregation import robust
from fedsb.config import FedSBConfig
from fedsb.wire import from_legacy_scalars, to_legacy_scalars
from server.rounds import TrainRound, message_config

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
                 on_metrics: Callable[[int, dict], None] = lambda node, m: None) -> SecAggResult:
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
                on_metrics(int(proxy.node_id), from_legacy_scalars(res.metrics))
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


class SecAggTrainRound(TrainRound):
    """The train round whose aggregate is computed by SecAgg+."""

    def run(self) -> None:
        srv, cfg, rnd = self.server, self.cfg, self.rnd
        global_vec = srv.method.get_vector(srv.model)
        sampled = self.sampled = srv.sample(rnd)
        if srv.basis is not None:  # SecAgg+ messages carry only FitIns: the basis goes first, in a plain query
            lacking = [n for n in sampled if n not in srv.state.basis_holders]

            def basis_content(node: int) -> RecordDict:
                rd = RecordDict({"config": ConfigRecord({"mode": "basis", "fingerprint": srv.state.fingerprint})})
                self.basis_bytes += srv.basis.attach(node, rd)
                return rd

            def on_basis(node: int, reply: Message, up: int) -> None:
                if reply.has_error():
                    srv.basis.forget([node])

            srv.transport.send(lacking, MessageType.QUERY, basis_content, "basis", on_basis)

        def config_for(node: int) -> dict:
            c = message_config(srv, node, rnd)
            if not c["dp-history"]:  # legacy config carries only scalars: a history only where DP has one
                del c["dp-history"]
            return c

        max_weight = float(max([srv.examples_of.get(n, 1) for n in sampled] + [1]))
        res = secagg_round(srv.transport.metered_grid(), cfg, rnd, sampled, global_vec, config_for, max_weight,
                           on_metrics=lambda node, m: [h.observe(node, m) for h in srv.hooks])
        self.totals["bytes_basis_total"] += self.basis_bytes
        problems = []
        if srv.basis is not None and res.fingerprints - {srv.state.fingerprint}:
            problems.append(f"basis fingerprints {sorted(res.fingerprints)} != {srv.state.fingerprint}")
        if res.aggregate is not None and not np.isfinite(res.aggregate).all():
            problems.append("non-finite secure aggregate")
        updated = res.aggregate is not None and res.results >= cfg.min_train_nodes and not problems
        if updated:
            srv.method.set_vector(srv.model, res.aggregate)
            srv.method.after_round(srv.model, rnd)
        else:
            # A single bad contribution cannot be removed from a secure sum: the round is dropped whole.
            log.warning("round %d: secure aggregate not applied (%d results, %s)", rnd, res.results, problems)
        up = self.totals["bytes_up"] - self.up0
        srv.state.up_per_client_round.extend([up / max(1, res.results)] * res.results)
        srv.rec.log(
            rnd, "train", loss=res.train_loss, clients=len(sampled), replies=res.results, failed=res.failures,
            dropouts_recovered=(len(sampled) - res.results) if updated else 0, updated=updated,
            rejected=[{"node": None, "reason": "secagg", "detail": p} for p in problems], rejected_count=len(problems),
            secagg=True, strategy_saw_only_aggregate=res.saw_only_aggregate,
            bytes_up=up, bytes_down=self.totals["bytes_down"] - self.down0, bytes_basis=self.basis_bytes,
            bytes_up_per_client=up / max(1, res.results), seconds=round(time.time() - self.t0, 3), **srv.hook_metrics(),
        )
