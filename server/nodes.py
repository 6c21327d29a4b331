"""The connected nodes as the server knows them: partition ids and sizes (from a hello query), the rank
each trains at (nested ranks), the nodes refused for holding another model, and the seeded per-round sample.

Sampling follows partitions, not the (random) node ids, so a run (or a resumed run) is deterministic
under its seed.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedsb.config import FedSBConfig
from fedsb.run.state import RunState
from server.transport import Transport

log = logging.getLogger("fedsb.server")


def sample_nodes(nodes: list[int], fraction: float, minimum: int, seed: int, rnd: int) -> list[int]:
    """Seeded sample of ``max(minimum, ceil(fraction·n))`` of the (partition-ordered) nodes."""
    k = max(minimum, math.ceil(fraction * len(nodes)))
    rng = np.random.default_rng([seed, rnd])
    return [nodes[i] for i in sorted(rng.choice(len(nodes), size=min(k, len(nodes)), replace=False))]


class Nodes:
    def __init__(self, cfg: FedSBConfig, state: RunState, transport: Transport, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep, model_id: str = ""):
        self.cfg, self.state, self.transport = cfg, state, transport
        self.model_id = model_id  # the run's model content id: a node whose hello names another is refused
        self.refused: dict[int, dict] = {}  # node -> why: never sampled again in this run
        self.examples_of: dict[int, int] = {}
        self.rank_of: dict[int, int] = {}  # nested ranks: the rank each node trains at (from its hello)
        self.clock, self.sleep = clock, sleep
        # after one wait for min-available-nodes that ran out, later rounds go on with the nodes there are
        # at once: waiting a whole round-timeout in every round would stall the run for nothing
        self.waited_out = False

    def wait(self, required: bool = True) -> list[int]:
        """The connected nodes, once at least min-available-nodes are (waiting up to round-timeout, at
        most once in a run). Before the first round too few is an error; later (a node restarting) the
        round goes on with the nodes there are (``short_of`` says by how many)."""
        grid = self.transport.grid
        deadline = self.clock() + (0.0 if self.waited_out and not required else self.cfg.round_timeout)
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.cfg.min_available_nodes:
                self.waited_out = False
                return nodes
            if self.clock() >= deadline:
                msg = (f"only {len(nodes)} node(s) connected after {self.cfg.round_timeout:.0f}s; "
                       f"min-available-nodes={self.cfg.min_available_nodes}")
                if required:
                    raise RuntimeError(msg)
                if not self.waited_out:
                    log.warning("%s: going on with them", msg)
                self.waited_out = True
                return nodes
            self.sleep(1.0)

    def short_of(self, nodes: list[int]) -> int:
        """How many nodes a round lacked to reach min-available-nodes (0: enough)."""
        return max(0, self.cfg.min_available_nodes - len(nodes))

    def hello(self, nodes: list[int]) -> None:
        """Ask every node for its partition id, size, rank and model; refuse a node whose model is not the run's.
        A node whose hello failed (a transient fault) stays eligible."""
        content = RecordDict({"config": ConfigRecord({"mode": "hello"})})

        def on_reply(node: int, reply: Message, up: int) -> None:
            if reply.has_error():
                log.warning("hello: node %d failed: %s", node, reply.error.reason)
                return
            m = reply.content["metrics"]
            identity = reply.content.config_records.get("config", {})
            # a client that does not say which model it holds stays eligible (a basis method's replies still carry
            # the fingerprint, which covers the model)
            theirs = str(identity.get("model-id", ""))
            if self.model_id and theirs and theirs != self.model_id:
                self.refuse(node, int(m["partition-id"]), theirs, str(identity.get("model-path", "")))
                return
            self.state.partition_of[node] = int(m["partition-id"])
            self.examples_of[node] = int(m["num-train-examples"])
            k = int(m.get("rank", self.cfg.rank))
            if not 1 <= k <= self.cfg.rank:
                log.warning("hello: node %d claims rank %d outside [1, %d]; it trains at %d", node, k, self.cfg.rank,
                            self.cfg.rank)
                k = self.cfg.rank
            self.rank_of[node] = k

        self.transport.send(nodes, MessageType.QUERY, lambda n: content, "hello", on_reply)
        for n in nodes:  # nodes that did not answer still take part, after the others
            self.state.partition_of.setdefault(n, 10**9 + n)

    def refuse(self, node: int, partition: int, model_id: str, model_path: str) -> None:
        """``node`` holds another model than the run's: its updates would be to other weights, and (for a method
        with a basis) it could not verify the basis it is sent. Logged once; the node is never sampled again."""
        where = f" at {model_path} on that node" if model_path else ""
        detail = (f"node {node} (partition-id {partition}) refused: its model has content id {model_id}{where}; the "
                  f"run's has {self.model_id}. It is not sampled again in this run; give that node a copy of the run's "
                  "model (--node-config model=PATH)")
        log.error("%s", detail)
        self.refused[node] = {"node_id": int(node), "partition-id": partition, "reason": "model-mismatch",
                              "model_id": model_id, "model_path": model_path, "detail": detail}

    def ordered(self, nodes) -> list[int]:
        """The nodes that were not refused, in partition order: every sample is drawn from these."""
        return sorted((n for n in nodes if n not in self.refused), key=lambda n: self.state.partition_of.get(n, 10**9 + n))

    def connected(self) -> list[int]:
        """The nodes connected now (waiting for min-available-nodes at most once), newcomers greeted."""
        nodes = self.wait(required=False)
        new = [n for n in nodes if n not in self.state.partition_of]
        if new:  # joined (or re-joined under a new id) since the hello: learn their partitions first
            self.hello(new)
        return nodes

    def sample(self, rnd: int, nodes: list[int]) -> list[int]:
        return sample_nodes(self.ordered(nodes), self.cfg.fraction_train, self.cfg.min_train_nodes, self.cfg.seed, rnd)

    def evaluation_sample(self, rnd: int, nodes: list[int], trained: list[int]) -> list[int]:
        """The nodes that evaluate round ``rnd``: as many as a round trains, drawn (with their own seed) from
        those that did not train it; only when there are too few are trainers added to them."""
        ordered = self.ordered(nodes)
        k = min(len(ordered), max(self.cfg.min_train_nodes, math.ceil(self.cfg.fraction_train * len(ordered))))
        rng = np.random.default_rng([self.cfg.seed, rnd, 1])
        trained = set(trained)
        rest = [n for n in ordered if n not in trained]
        chosen = [rest[i] for i in rng.choice(len(rest), size=min(k, len(rest)), replace=False)]
        others = [n for n in ordered if n in trained]
        chosen += [others[i] for i in rng.choice(len(others), size=k - len(chosen), replace=False)]
        return self.ordered(chosen)

    def rank(self, node: int) -> int:
        return self.rank_of.get(node, self.cfg.rank)
