"""One training round in the shape of a Flower strategy: configure, then each reply as it arrives, then
aggregate. ``TrainRound`` is the round every method runs; ``server.secagg.SecAggTrainRound`` replaces
only how replies are gathered and summed. DP wraps both through the server's round hooks.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
import tracemalloc
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedsb.aggregation import robust
from fedsb.aggregation.validation import InvalidReply, ReplySpec, check_reply
from fedsb.wire import MESSAGE_CONFIG_DEFAULTS
from server.basis import reject
from server.transport import arrays, arrays_of

if TYPE_CHECKING:
    from server.driver import FedSBServer

log = logging.getLogger("fedsb.server")
TRACE_MEMORY = os.environ.get("FEDSB_TRACE_MEMORY") == "1"  # bench.scale: the server's peak memory per round


def message_config(server: "FedSBServer", node: int, rnd: int) -> dict[str, Any]:
    """The config of a train/evaluate message: round and basis, then the method's and the hooks' entries."""
    k = server.node_rank(node)
    fingerprint = server.basis.fingerprint_for(node) if server.basis is not None else ""
    return {"round": rnd, "fingerprint": fingerprint, **MESSAGE_CONFIG_DEFAULTS, **server.method.round_config(),
            **({"rank": k} if k != server.cfg.rank else {}), **server.hook_config(node)}


def node_view(server: "FedSBServer", node: int, global_vec: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """(positions, values) of the part of the global vector ``node`` trains: all of it, or its nested block."""
    index = server.method.block_index(server.model, server.node_rank(node))
    return index, (global_vec if index is None else global_vec[index])


def model_content(server: "FedSBServer", node: int, rnd: int, global_vec: np.ndarray) -> tuple[RecordDict, int]:
    """A train/evaluate message for ``node``: its part of the global vector, config, the basis if the node
    lacks it, and the method's extra download. Returns it with the bytes the basis added."""
    rd = RecordDict({"adapter": arrays(adapter=node_view(server, node, global_vec)[1]),
                     "config": ConfigRecord(message_config(server, node, rnd))})
    basis_bytes = server.basis.attach(node, rd) if server.basis is not None else 0
    extra = server.method.extra_download(node)
    if extra:
        rd["extra"] = arrays(**extra)
    return rd, basis_bytes


class TrainRound:
    def __init__(self, server: "FedSBServer", rnd: int):
        self.server, self.cfg, self.rnd = server, server.cfg, rnd
        self.t0 = time.time()
        self.totals = server.state.totals
        self.down0, self.up0 = self.totals["bytes_down"], self.totals["bytes_up"]
        self.basis_bytes = 0
        self.sampled: list[int] = []
        self.weights: list[float] = []
        self.rejected: list[dict] = []
        self.counts = {"failed": 0, "basis_resent": 0, "budget_exhausted": 0}
        self.losses: list[tuple[float, int]] = []
        self.up_sizes: list[float] = []
        self.peak_memory = 0  # the largest peak memory a client reported for its step
        self.timings: list[dict[str, float]] = []  # per reply: where the client's time went

    # -- the strategy-shaped steps -----------------------------------------------------------------
    def configure(self) -> list[int]:
        self.global_vec = self.server.method.get_vector(self.server.model)
        self.sampled = self.server.sample(self.rnd)
        # Plain FedAvg-style rules stream every reply into a running sum (server memory does not grow
        # with the number of clients), entry by entry, so nested-rank blocks average where they overlap;
        # FedEx/FLoRA and the robust rules need all vectors at once.
        self.streaming = self.server.method.streamable and self.cfg.aggregation == "mean"
        self.running, self.vectors = robust.BlockWeightedMean(self.global_vec), []
        self.lacking: list[int] = []
        self.seed_failed: list[int] = []  # nodes that could not regenerate a random basis from its seed
        return self.sampled

    def content_for(self, node: int) -> RecordDict:
        rd, added = model_content(self.server, node, self.rnd, self.global_vec)
        self.basis_bytes += added
        return rd

    def on_reply(self, node: int, reply: Message, up: int) -> None:
        if reply.has_error():
            self.counts["failed"] += 1
            log.warning("round %d: node %d failed: %s", self.rnd, node, reply.error.reason)
            return
        status = reply.content.config_records.get("config", {}).get("status")
        if status == "need-basis":
            self.lacking.append(node)
            if reply.content["config"].get("basis-seed-failed"):
                self.seed_failed.append(node)
            return
        self.server.observe(node, reply)
        if status == "budget-exhausted":
            self.counts["budget_exhausted"] += 1
            log.info("round %d: node %d did not train: %s", self.rnd, node, reply.content["config"].get("reason", status))
            return
        index, sent = node_view(self.server, node, self.global_vec)  # a block larger than the node's is refused
        spec = ReplySpec(shapes={"adapter": sent.shape}, max_update_norm=self.cfg.max_update_norm,
                         fingerprint=self.server.basis.fingerprint_for(node) if self.server.basis else None,
                         max_num_examples=self.cfg.max_num_examples)
        try:
            n_ex = check_reply(spec, arrays_of(reply, "adapter"), reply.content["metrics"].get("num-examples"),
                               reply.content["config"].get("fingerprint"), {"adapter": sent})
        except (InvalidReply, KeyError) as e:
            self.rejected.append(reject(node, e))
            return
        vec = reply.content["adapter"]["adapter"].numpy()
        if self.streaming:
            self.running.add(vec, float(n_ex), index)
        else:
            self.vectors.append(vec)
        self.weights.append(float(n_ex))
        self.peak_memory = max(self.peak_memory, int(reply.content["metrics"].get("peak-memory-bytes", 0)))
        self.timings.append({k: float(v) for k, v in reply.content["metrics"].items()
                             if k.startswith("time-") or k == "seconds"})
        if "train-loss" in reply.content["metrics"]:  # absent under dp (not privatized, kept on the client)
            self.losses.append((float(reply.content["metrics"]["train-loss"]), n_ex))
        self.up_sizes.append(up)

    def gather(self) -> None:
        """Send to the sampled nodes and take their replies; a node that lost its state is sent it again,
        once, this round."""
        send = self.server.transport.send
        # (not `counts["failed"] += len(send(...))`: on_reply counts failures while send runs, and the
        # augmented assignment would write back the value it read before the call)
        timed_out = send(self.sampled, MessageType.TRAIN, self.content_for, "train", self.on_reply)
        self.counts["failed"] += len(timed_out)
        if self.lacking:
            log.info("round %d: re-sending the basis to %d node(s) that lack it", self.rnd, len(self.lacking))
            again, self.lacking = list(self.lacking), []
            self.server.forget_nodes(again, self.seed_failed)
            self.counts["basis_resent"] += len(again)
            timed_out = send(again, MessageType.TRAIN, self.content_for, "train", self.on_reply)
            self.counts["failed"] += len(timed_out)

    def aggregate(self) -> np.ndarray | None:
        if len(self.weights) < self.cfg.min_train_nodes:
            return None
        if self.streaming:
            return self.running.result()
        return self.server.method.aggregate(self.server.model, self.vectors, self.weights, self.server.combine)

    def record(self, updated: bool) -> dict[str, Any]:
        losses, up_sizes = self.losses, self.up_sizes
        self.server.state.up_per_client_round.extend(up_sizes)
        return {
            "loss": robust.weighted_scalar_mean(losses),
            "clients": len(self.sampled), "replies": len(self.weights), "failed": self.counts["failed"],
            "basis_resent": self.counts["basis_resent"], "budget_exhausted": self.counts["budget_exhausted"],
            **self.server.hook_metrics(), "rejected": self.rejected, "rejected_count": len(self.rejected),
            "updated": updated, "examples": int(sum(self.weights)),
            "bytes_up": self.totals["bytes_up"] - self.up0, "bytes_down": self.totals["bytes_down"] - self.down0,
            "bytes_basis": self.basis_bytes,
            "bytes_up_per_client": (sum(up_sizes) / len(up_sizes)) if up_sizes else None,
            "client_peak_memory_bytes": self.peak_memory or None,
            # median over the replies of where a client's time went: process age at the handler, config and
            # task load, model and basis, partition, local training
            "client_seconds": {k.removeprefix("time-"): round(statistics.median(t[k] for t in self.timings if k in t), 3)
                               for k in dict.fromkeys(k for t in self.timings for k in t)} or None,
        }

    # -- the round, start to end -------------------------------------------------------------------
    def run(self) -> None:
        if TRACE_MEMORY:
            tracemalloc.start() if not tracemalloc.is_tracing() else tracemalloc.reset_peak()
            mem0 = tracemalloc.get_traced_memory()[0]
        self.configure()
        self.gather()
        self.totals["bytes_basis_total"] += self.basis_bytes
        new = self.aggregate()
        if new is not None:
            self.server.method.set_vector(self.server.model, new)
            self.server.method.after_round(self.server.model, self.rnd)
        else:
            log.warning("round %d: %d valid replies < min-train-nodes=%d; keeping the previous adapter",
                        self.rnd, len(self.weights), self.cfg.min_train_nodes)
        row = self.record(new is not None)
        row["seconds"] = round(time.time() - self.t0, 3)
        if TRACE_MEMORY:
            row["server_peak_bytes"] = tracemalloc.get_traced_memory()[1] - mem0
        self.server.rec.log(self.rnd, "train", **row)


def sample_nodes(nodes: list[int], fraction: float, minimum: int, seed: int, rnd: int) -> list[int]:
    """Seeded sample of ``max(minimum, ceil(fraction·n))`` of the (partition-ordered) nodes."""
    k = max(minimum, math.ceil(fraction * len(nodes)))
    rng = np.random.default_rng([seed, rnd])
    return [nodes[i] for i in sorted(rng.choice(len(nodes), size=min(k, len(nodes)), replace=False))]
