"""Flower ServerApp: the Fed-SB protocol (DESIGN.md §2) as a custom loop over the Grid.

Thin glue: the maths (initialization, aggregation, validation, export) lives in ``fedsb``; this file
only turns it into messages, sends them, and records what happened.
"""

from __future__ import annotations

import logging
import math
import os
import time
import tracemalloc

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid, ServerApp

from fedsb import adapters, robust
from fedsb.checkpoint import check_compatible, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from fedsb.config import FedSBConfig
from fedsb.export import export_peft, head_state, save_fedsb_adapter
from fedsb.init import apply_bases, basis_fingerprint, compute_bases, random_bases
from fedsb.methods import FedExLoRA, FLoRA, FedSB, flatten, unflatten_into
from fedsb.records import CHECKPOINT, RunRecorder, prepare_run_dir, versions
from fedsb.task import get_task
from fedsb.training import evaluate
from fedsb.validation import InvalidReply, ReplySpec, check_num_examples, check_reply

log = logging.getLogger("fedsb.server")

# How often replies are pulled: Flower's own send_and_receive sleeps 3 s between pulls in deployment.
POLL_SECONDS = 0.2
PUSH_CHUNK = 64  # messages built and pushed at a time (see FedSBServer.send)
TRACE_MEMORY = os.environ.get("FEDSB_TRACE_MEMORY") == "1"

app = ServerApp()

# Checkpoint fields that must match for resume=true (anything else may change, e.g. round-timeout).
IDENTITY_KEYS = ("task", "model", "dataset", "method", "rank", "scale", "target-modules", "seed",
                 "label-column", "text-column", "max-length", "init-update", "init-samples", "init-lr",
                 "partitioner", "dirichlet-alpha", "lora-alpha", "dp", "secagg")


def nbytes(content: RecordDict) -> int:
    """Bytes of a message's serialized content (what crosses the wire, framing included)."""
    return recorddict_to_proto(content).ByteSize()


def arrays(**named: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in named.items()})


class FedSBServer:
    """One run: wait for nodes, initialize, R-only rounds, evaluate, checkpoint, export."""

    def __init__(self, grid: Grid, cfg: FedSBConfig):
        self.grid, self.cfg = grid, cfg
        self.run_dir = prepare_run_dir(cfg)
        self.task = get_task(cfg)  # validates model, data, targets and rank before anything is sent
        self.method = self.task.method()
        self.model = self.task.base_model()
        self.rec = RunRecorder(self.run_dir, cfg.method)
        test = self.task.data.test_dataset(cfg.eval_max_samples)
        self.test_loader = self.task.loader(test, shuffle=False, batch_size=64)
        self.basis_holders: set[int] = set()  # nodes that were sent the current basis
        self.fingerprint: str | None = None
        self.basis_vec: np.ndarray | None = None
        self.partition_of: dict[int, int] = {}
        self.examples_of: dict[int, int] = {}
        self.dp_history: dict[int, list[float]] = {}  # partition -> flat [σ, q, steps, ...] it reported
        self.dp_sigma: dict[int, float] = {}
        self.flora_held: dict[int, int] = {}  # FLoRA: number of folded stacks each node holds
        self.start_round = 1
        self.totals = {"bytes_up": 0, "bytes_down": 0, "bytes_basis_total": 0, "bytes_init_total": 0}
        self.up_per_client_round: list[int] = []

    # ------------------------------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.cfg
        t0 = time.time()
        nodes = self.wait_for_nodes()
        if cfg.resume:
            self.restore()
            self.hello(nodes)  # node ids are new after a restart; partitions are not
        else:
            self.initialize(nodes)
            self.evaluate(0, time.time() - t0)
            self.checkpoint(0)
        for rnd in range(self.start_round, cfg.num_server_rounds + 1):
            self.train_round(rnd)
            if rnd % cfg.eval_every == 0 or rnd == cfg.num_server_rounds:
                self.evaluate(rnd)
                if cfg.federated_evaluate:
                    self.federated_evaluate(rnd)
            self.checkpoint(rnd)
        self.finish(time.time() - t0)

    def wait_for_nodes(self, required: bool = True) -> list[int]:
        """The connected nodes, once at least min-available-nodes are (waiting up to round-timeout).
        Before the first round too few is an error; later (a node restarting) the round goes on with
        the nodes there are, after the wait."""
        deadline = time.time() + self.cfg.round_timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.cfg.min_available_nodes:
                return nodes
            if time.time() > deadline:
                msg = (f"only {len(nodes)} node(s) connected after {self.cfg.round_timeout:.0f}s; "
                       f"min-available-nodes={self.cfg.min_available_nodes}")
                if required:
                    raise RuntimeError(msg)
                log.warning("%s: going on with them", msg)
                return nodes
            time.sleep(1.0)

    # ------------------------------------------------------------------------------------------
    def hello(self, nodes: list[int]) -> None:
        """Ask every node for its partition id and size: sampling then follows partitions, not the
        (random) node ids, so a run (or a resumed run) is deterministic under its seed."""
        content = RecordDict({"config": ConfigRecord({"mode": "hello"})})

        def on_reply(node: int, reply: Message, up: int) -> None:
            if reply.has_error():
                log.warning("hello: node %d failed: %s", node, reply.error.reason)
                return
            m = reply.content["metrics"]
            self.partition_of[node] = int(m["partition-id"])
            self.examples_of[node] = int(m["num-train-examples"])

        self.send(nodes, MessageType.QUERY, lambda n: content, "hello", on_reply)
        for n in nodes:  # nodes that did not answer still take part, after the others
            self.partition_of.setdefault(n, 10**9 + n)

    def ordered(self, nodes) -> list[int]:
        return sorted(nodes, key=lambda n: self.partition_of.get(n, 10**9 + n))

    def initialize(self, nodes: list[int]) -> None:
        """Fed-SB: average the clients' init gradients, update approximation, SVD -> B, A, R0 (or, with
        init-basis=random, a seeded random basis and no query)."""
        cfg, t0 = self.cfg, time.time()
        self.hello(nodes)
        names = self.task.layer_names
        if not isinstance(self.method, FedSB):
            self.method.build(self.model, names)
            self.rec.log(0, "init", clients=len(nodes), bytes_up=0, bytes_down=0, seconds=round(time.time() - t0, 3))
            return
        shapes = {n: adapters.linear_shape(self.model.get_submodule(n)) for n in names}
        if cfg.init_basis == "random":  # no query: nothing about the clients' data goes into the basis
            self.install_bases(random_bases(shapes, cfg.rank, cfg.seed))
            self.rec.log(0, "init", clients=0, bytes_up=0, bytes_down=0, seconds=round(time.time() - t0, 3),
                         fingerprint=self.fingerprint, init_basis="random")
            return
        nodes = self.ordered(nodes)
        k = max(1, math.ceil(cfg.init_fraction * len(nodes)))
        rng = np.random.default_rng(cfg.seed)
        asked = [nodes[int(i)] for i in sorted(rng.choice(len(nodes), size=min(k, len(nodes)), replace=False))]
        content = RecordDict({
            "config": ConfigRecord({"mode": "fed-sb-init", "layers": names, "dp-delta": self.dp_delta()}),
            "head": arrays(head=flatten(head_state(self.model))),
        })
        total = sum(m * n for m, n in shapes.values())
        # each client sums the gradient over at most init-samples examples; a larger claimed count would
        # shrink everyone else's share of the mean gradient
        spec = ReplySpec(shapes={"grads": (total,)}, max_num_examples=cfg.init_samples)
        grad_sum, count, rejected = np.zeros(total, np.float64), 0, []
        down_before = self.totals["bytes_down"]

        def on_reply(node: int, reply: Message, up: int) -> None:
            nonlocal count
            if reply.has_error():
                rejected.append({"node": int(node), "reason": "failed", "detail": reply.error.reason})
                return
            try:
                got = check_reply(spec, _arrays_of(reply, "grads"), reply.content["metrics"].get("num-examples"), None)
            except (InvalidReply, KeyError) as e:
                rejected.append(_reject(node, e))
                return
            grad_sum[:] += reply.content["grads"]["grads"].numpy()  # streamed: one reply in memory at a time
            count += got
            self.note_dp(node, reply)
            self.totals["bytes_init_total"] += up

        self.send(asked, MessageType.QUERY, lambda n: content, "init", on_reply)
        if count == 0:
            raise RuntimeError(f"no valid initialization gradients (rejected: {rejected})")
        grads, offset = {}, 0
        for n, (m, k_) in shapes.items():
            grads[n] = torch.from_numpy(grad_sum[offset : offset + m * k_].reshape(m, k_))
            offset += m * k_
        self.install_bases(compute_bases(grads, count, cfg.rank, scale=cfg.scale, update=cfg.init_update,
                                         lr=cfg.init_lr, svd=cfg.init_svd, seed=cfg.seed))
        self.rec.log(0, "init", clients=len(asked), accepted=len(asked) - len(rejected), rejected=rejected,
                     bytes_up=self.totals["bytes_init_total"], bytes_down=self.totals["bytes_down"] - down_before,
                     examples=count, seconds=round(time.time() - t0, 3), fingerprint=self.fingerprint)

    def install_bases(self, bases: dict) -> None:
        layers = self.method.build(self.model, self.task.layer_names)
        if self.cfg.basis_dtype == "bfloat16":  # what clients will hold after the bfloat16 broadcast
            for b in bases.values():
                b.B, b.A = b.B.bfloat16().float(), b.A.bfloat16().float()
        apply_bases(layers, bases)
        self.set_basis()

    def set_basis(self) -> None:
        layers = adapters.adapter_layers(self.model)
        parts = {}
        for n, l in layers.items():
            parts[n + ".B"], parts[n + ".A"] = l.sb_B, l.sb_A
        self.basis_vec = flatten(parts)
        self.fingerprint = basis_fingerprint(self.task.model_path, self.cfg.rank,
                                             {n: (l.sb_B, l.sb_A) for n, l in layers.items()})

    def basis_record(self) -> ArrayRecord:
        if self.cfg.basis_dtype == "bfloat16":
            # Halves the one-time broadcast: bfloat16 bits carried in a uint16 array.
            bits = torch.from_numpy(self.basis_vec).bfloat16().view(torch.uint16).numpy()
            return arrays(basis_bf16=bits)
        return arrays(basis=self.basis_vec)

    # ------------------------------------------------------------------------------------------
    def sample(self, rnd: int) -> list[int]:
        nodes = self.wait_for_nodes(required=False)
        new = [n for n in nodes if n not in self.partition_of]
        if new:  # joined (or re-joined under a new id) since the hello: learn their partitions first
            self.hello(new)
        nodes = self.ordered(nodes)
        k = max(self.cfg.min_train_nodes, math.ceil(self.cfg.fraction_train * len(nodes)))
        rng = np.random.default_rng([self.cfg.seed, rnd])
        return [nodes[i] for i in sorted(rng.choice(len(nodes), size=min(k, len(nodes)), replace=False))]

    def train_content(self, node: int, rnd: int, global_vec: np.ndarray, with_basis: bool) -> RecordDict:
        rd = RecordDict({
            "adapter": arrays(adapter=global_vec),
            "config": ConfigRecord({"round": rnd, "fingerprint": self.fingerprint or "",
                                    "flora-stacks": len(getattr(self.method, "stacks", [])),
                                    "dp-delta": self.dp_delta(),
                                    "dp-history": self.dp_history.get(self.partition_of.get(node, -1), [])}),
        })
        if with_basis:
            rd["basis"] = self.basis_record()
        extra = self.extra_download(node)
        if extra:
            rd["extra"] = arrays(**extra)
        return rd

    def extra_download(self, node: int) -> dict[str, np.ndarray]:
        if isinstance(self.method, FedExLoRA):
            return self.method.extra_download()
        if isinstance(self.method, FLoRA):
            # each node receives only the stacks it has not folded yet (it keeps the rest in its state)
            held = self.flora_held.get(node, 0)
            self.flora_held[node] = len(self.method.stacks)
            return self.method.stacks_since(held)
        return {}

    def train_round(self, rnd: int) -> None:
        if self.cfg.secagg:
            return self.secagg_train_round(rnd)
        cfg, t0 = self.cfg, time.time()
        if TRACE_MEMORY:  # bench.scale: peak Python/numpy memory the server allocates during a round
            tracemalloc.start() if not tracemalloc.is_tracing() else tracemalloc.reset_peak()
            mem0 = tracemalloc.get_traced_memory()[0]
        fed_sb = isinstance(self.method, FedSB)
        global_vec = self.method.get_vector(self.model)
        sampled = self.sample(rnd)
        spec = ReplySpec(shapes={"adapter": global_vec.shape}, fingerprint=self.fingerprint if fed_sb else None,
                         max_update_norm=cfg.max_update_norm, max_num_examples=cfg.max_num_examples)
        reference = {"adapter": global_vec}
        down_before, up_before = self.totals["bytes_down"], self.totals["bytes_up"]
        basis_bytes = 0
        # Plain FedAvg-style rules stream every reply into a running sum (server memory does not grow
        # with the number of clients); FedEx/FLoRA and the robust rules need all vectors at once.
        streaming = self.method.streamable and cfg.aggregation == "mean"
        running, vectors, weights = robust.RunningWeightedMean(), [], []
        rejected, lacking, losses, up_sizes, exhausted, resent = [], [], [], [], [], []
        failed = 0

        def content_for(node: int) -> RecordDict:
            nonlocal basis_bytes
            with_basis = fed_sb and node not in self.basis_holders
            rd = self.train_content(node, rnd, global_vec, with_basis)
            if with_basis:
                basis_bytes += nbytes(RecordDict({"basis": rd["basis"]}))
                self.basis_holders.add(node)
            return rd

        def on_reply(node: int, reply: Message, up: int) -> None:
            nonlocal failed
            if reply.has_error():
                failed += 1
                log.warning("round %d: node %d failed: %s", rnd, node, reply.error.reason)
                return
            status = reply.content.config_records.get("config", {}).get("status")
            if status == "need-basis":
                lacking.append(node)
                return
            self.note_dp(node, reply)
            if status == "budget-exhausted":
                exhausted.append(node)
                return
            try:
                n_ex = check_reply(spec, _arrays_of(reply, "adapter"), reply.content["metrics"].get("num-examples"),
                                   reply.content["config"].get("fingerprint"), reference)
            except (InvalidReply, KeyError) as e:
                rejected.append(_reject(node, e))
                return
            vec = reply.content["adapter"]["adapter"].numpy()
            if streaming:
                running.add(vec, float(n_ex))
            else:
                vectors.append(vec)
            weights.append(float(n_ex))
            if "train-loss" in reply.content["metrics"]:  # absent under dp (not privatized, kept on the client)
                losses.append((float(reply.content["metrics"]["train-loss"]), n_ex))
            up_sizes.append(up)

        timed_out = self.send(sampled, MessageType.TRAIN, content_for, "train", on_reply)
        failed += len(timed_out)  # (not `failed += len(self.send(...))`: on_reply updates `failed` meanwhile)
        if lacking:  # lost its basis (restart, wiped state): send it again, once, this round
            log.info("round %d: re-sending the basis to %d node(s) that lack it", rnd, len(lacking))
            self.basis_holders.difference_update(lacking)
            for n in lacking:
                self.flora_held.pop(n, None)
            again, lacking[:] = list(lacking), []
            resent.extend(again)
            timed_out = self.send(again, MessageType.TRAIN, content_for, "train", on_reply)
            failed += len(timed_out)
        self.totals["bytes_basis_total"] += basis_bytes
        updated = len(weights) >= cfg.min_train_nodes
        if updated:
            new = running.result() if streaming else self.method.aggregate(self.model, vectors, weights, self.combine)
            self.method.set_vector(self.model, new)
            self.method.after_round(self.model, rnd)
        else:
            log.warning("round %d: %d valid replies < min-train-nodes=%d; keeping the previous adapter",
                        rnd, len(weights), cfg.min_train_nodes)
        self.up_per_client_round.extend(up_sizes)
        self.rec.log(
            rnd, "train",
            loss=(sum(l * n for l, n in losses) / sum(n for _, n in losses)) if losses else None,
            clients=len(sampled), replies=len(weights), failed=failed, basis_resent=len(resent),
            budget_exhausted=len(exhausted), **self.dp_round_metrics(),
            rejected=rejected, rejected_count=len(rejected), updated=updated, examples=int(sum(weights)),
            bytes_up=self.totals["bytes_up"] - up_before, bytes_down=self.totals["bytes_down"] - down_before,
            bytes_basis=basis_bytes, bytes_up_per_client=(sum(up_sizes) / len(up_sizes)) if up_sizes else None,
            seconds=round(time.time() - t0, 3),
            **({"server_peak_bytes": tracemalloc.get_traced_memory()[1] - mem0} if TRACE_MEMORY else {}),
        )

    def secagg_train_round(self, rnd: int) -> None:
        """A round whose aggregate is computed by SecAgg+: the server sees only the weighted mean."""
        from server.secagg import secagg_round

        cfg, t0 = self.cfg, time.time()
        fed_sb = isinstance(self.method, FedSB)
        global_vec = self.method.get_vector(self.model)
        sampled = self.sample(rnd)
        down_before, up_before = self.totals["bytes_down"], self.totals["bytes_up"]
        basis_bytes = 0
        if fed_sb:  # SecAgg+ messages carry only FitIns: the basis goes first, in a plain query
            lacking = [n for n in sampled if n not in self.basis_holders]
            content = RecordDict({"config": ConfigRecord({"mode": "basis", "fingerprint": self.fingerprint}),
                                  "basis": self.basis_record()})
            basis_bytes = nbytes(RecordDict({"basis": content["basis"]})) * len(lacking)

            def on_basis(node: int, reply: Message, up: int) -> None:
                if not reply.has_error():
                    self.basis_holders.add(node)

            self.send(lacking, MessageType.QUERY, lambda n: content, "basis", on_basis)
        config = {"round": rnd, "fingerprint": self.fingerprint or "", "dp-delta": self.dp_delta(),
                  "flora-stacks": len(getattr(self.method, "stacks", []))}
        max_weight = float(max([self.examples_of.get(n, 1) for n in sampled] + [1]))
        metered = MeteredGrid(self.grid, self.totals)
        res = secagg_round(metered, cfg, rnd, sampled, global_vec, config, max_weight)
        self.totals["bytes_basis_total"] += basis_bytes
        problems = []
        if fed_sb and res.fingerprints - {self.fingerprint}:
            problems.append(f"basis fingerprints {sorted(res.fingerprints)} != {self.fingerprint}")
        if res.aggregate is not None and not np.isfinite(res.aggregate).all():
            problems.append("non-finite secure aggregate")
        updated = res.aggregate is not None and res.results >= cfg.min_train_nodes and not problems
        if updated:
            self.method.set_vector(self.model, res.aggregate)
            self.method.after_round(self.model, rnd)
        else:
            # A single bad contribution cannot be removed from a secure sum: the round is dropped whole.
            log.warning("round %d: secure aggregate not applied (%d results, %s)", rnd, res.results, problems)
        up = self.totals["bytes_up"] - up_before
        self.up_per_client_round.extend([up / max(1, res.results)] * res.results)
        self.rec.log(
            rnd, "train", loss=res.train_loss, clients=len(sampled), replies=res.results, failed=res.failures,
            dropouts_recovered=(len(sampled) - res.results) if updated else 0, updated=updated,
            rejected=[{"node": None, "reason": "secagg", "detail": p} for p in problems], rejected_count=len(problems),
            secagg=True, strategy_saw_only_aggregate=res.saw_only_aggregate,
            bytes_up=up, bytes_down=self.totals["bytes_down"] - down_before, bytes_basis=basis_bytes,
            bytes_up_per_client=up / max(1, res.results), seconds=round(time.time() - t0, 3), **self.dp_round_metrics(),
        )

    # -- differential privacy bookkeeping (the clients add the noise; the server only keeps count) ---
    def dp_delta(self) -> float:
        if not self.cfg.dp:
            return 0.0
        if self.cfg.target_delta > 0:
            return self.cfg.target_delta
        from fedsb.privacy import default_delta

        return default_delta(min(self.examples_of.values()) if self.examples_of else 1)

    def note_dp(self, node: int, reply: Message) -> None:
        m = reply.content.metric_records.get("metrics")
        if self.cfg.dp and m is not None and "dp-history" in m:
            pid = self.partition_of.get(node, -1)
            self.dp_history[pid] = [float(x) for x in m["dp-history"]]
            self.dp_sigma[pid] = float(m["noise-multiplier"])

    def epsilons(self) -> dict[int, float]:
        from fedsb.privacy import epsilon_from_history

        return {pid: epsilon_from_history([tuple(h[i : i + 3]) for i in range(0, len(h), 3)], self.dp_delta(),
                                          self.cfg.accountant) for pid, h in self.dp_history.items()}

    def dp_round_metrics(self) -> dict:
        if not self.cfg.dp:
            return {}
        eps = self.epsilons()
        return {"epsilon": max(eps.values()) if eps else 0.0, "epsilon_per_client": {str(k): v for k, v in eps.items()}}

    def combine(self, vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
        if self.cfg.aggregation == "median":
            return robust.coordinate_median(vectors)
        if self.cfg.aggregation == "trimmed-mean":
            return robust.trimmed_mean(vectors, self.cfg.trim_fraction)
        return robust.weighted_mean(vectors, weights)

    # ------------------------------------------------------------------------------------------
    def send(self, nodes: list[int], mtype: str, content_for, phase: str, on_reply) -> list[int]:
        """Push one message per node, then hand each reply to ``on_reply(node, reply, bytes_up)`` as it
        arrives (and let it go), until all replied or round-timeout passed. Flower's send_and_receive
        would hold every reply at once and, in deployment, poll only every 3 s."""
        pending: dict[str, int] = {}
        # built and pushed a chunk at a time: every message carries its own copy of the global vector, so
        # building all of them first would hold (number of nodes) copies in this process at once
        for i in range(0, len(nodes), PUSH_CHUNK):
            chunk, msgs = nodes[i : i + PUSH_CHUNK], []
            for n in chunk:
                content = content_for(n)
                self.totals["bytes_down"] += nbytes(content)
                msgs.append(Message(content, dst_node_id=int(n), message_type=mtype))
            pending.update((mid, int(n)) for mid, n in zip(self.grid.push_messages(msgs), chunk))
            del msgs
        deadline = time.time() + self.cfg.round_timeout
        while pending and time.time() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
                up = 0 if reply.has_error() else nbytes(reply.content)
                self.totals["bytes_up"] += up
                on_reply(node, reply, up)
            if pending:
                time.sleep(POLL_SECONDS)
        for node in pending.values():
            log.warning("%s: node %d did not reply within %.0fs", phase, node, self.cfg.round_timeout)
        return list(pending.values())  # the nodes that timed out

    @torch.no_grad()
    def evaluate(self, rnd: int, seconds: float | None = None) -> dict:
        t0 = time.time()
        m = evaluate(self.model, self.test_loader, self.task.loss_fn, self.cfg.task)
        if self.cfg.task == "causal-lm" and self.cfg.eval_generate_samples > 0 and self.task.data.records:
            # generation-based exact match on a bounded number of held-out problems (math data)
            from fedsb.causal import evaluate_exact_match

            recs = [r for r in self.task.data.records if r.final][: self.cfg.eval_generate_samples]
            if recs:
                m["exact_match"] = evaluate_exact_match(self.model, self.task.tokenizer, recs, self.cfg.max_new_tokens,
                                                        16, use_chat_template=True)
        shown = {k: round(v, 4) for k, v in m.items() if k in ("accuracy", "perplexity", "exact_match") and v is not None}
        log.info("round %d: held-out loss %.4f %s", rnd, m["loss"], shown)
        return self.rec.log(rnd, "evaluate", loss=m["loss"], accuracy=m.get("accuracy"),
                            perplexity=m.get("perplexity"), exact_match=m.get("exact_match"),
                            examples=m["num-examples"], bytes_up=0, bytes_down=0,
                            clients=0, seconds=round((seconds or 0) + time.time() - t0, 3))

    def federated_evaluate(self, rnd: int) -> dict:
        """The sampled clients evaluate the global adapter on their local data (example-weighted)."""
        t0 = time.time()
        down0, up0 = self.totals["bytes_down"], self.totals["bytes_up"]
        global_vec = self.method.get_vector(self.model)
        fed_sb = isinstance(self.method, FedSB)
        results: list[tuple[dict, int]] = []

        def content_for(node: int) -> RecordDict:
            with_basis = fed_sb and node not in self.basis_holders
            if with_basis:
                self.basis_holders.add(node)
            return self.train_content(node, rnd, global_vec, with_basis)

        def on_reply(node: int, reply: Message, up: int) -> None:
            if reply.has_error() or reply.content.config_records.get("config", {}).get("status") != "ok":
                return
            m = dict(reply.content["metrics"])
            try:
                results.append((m, check_num_examples(m.get("num-examples"))))
            except InvalidReply as e:
                _reject(node, e)

        self.send(self.sample(rnd), MessageType.EVALUATE, content_for, "federated-evaluate", on_reply)
        total = sum(n for _, n in results)
        mean = (lambda k: sum(m[k] * n for m, n in results) / total if total and all(k in m for m, _ in results) else None)
        return self.rec.log(rnd, "federated-evaluate", loss=mean("loss"), accuracy=mean("accuracy"), clients=len(results),
                            examples=total, bytes_up=self.totals["bytes_up"] - up0,
                            bytes_down=self.totals["bytes_down"] - down0, seconds=round(time.time() - t0, 3))

    # ------------------------------------------------------------------------------------------
    def checkpoint(self, rnd: int) -> None:
        tensors = {"global": torch.from_numpy(self.method.get_vector(self.model).copy())}
        if self.basis_vec is not None:
            tensors["basis"] = torch.from_numpy(self.basis_vec.copy())
        for k, v in self.method.server_state().items():
            tensors["method." + k] = v
        state = {
            "round": rnd, "config": self.cfg.to_run_config(), "fingerprint": self.fingerprint,
            "basis_holders": sorted(self.basis_holders), "flora_held": {str(k): v for k, v in self.flora_held.items()}, "partition_of": {str(k): v for k, v in self.partition_of.items()},
            "totals": self.totals, "dp_history": {str(k): v for k, v in self.dp_history.items()},
            "dp_sigma": {str(k): v for k, v in self.dp_sigma.items()}, "up_per_client_round": self.up_per_client_round, "records": self.rec.records,
            "rng": rng_state(),
        }
        save_checkpoint(self.run_dir / CHECKPOINT, tensors, state)

    def restore(self) -> None:
        tensors, state = load_checkpoint(self.run_dir / CHECKPOINT)
        check_compatible(state["config"], {k: v for k, v in self.cfg.to_run_config().items() if k in IDENTITY_KEYS})
        self.method.build(self.model, self.task.layer_names)
        if "basis" in tensors:
            self.basis_vec = tensors["basis"].numpy()
            unflatten_into({k: v for n, l in adapters.adapter_layers(self.model).items() for k, v in ((n + ".B", l.sb_B), (n + ".A", l.sb_A))}, self.basis_vec)
            self.set_basis()
            if self.fingerprint != state["fingerprint"]:
                raise RuntimeError("checkpoint basis does not reproduce its fingerprint: the file is corrupt")
        self.method.load_server_state(self.model, {k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")})
        self.method.set_vector(self.model, tensors["global"].numpy())
        self.basis_holders = set(state["basis_holders"])  # ids of a restarted federation will not match: re-sent
        self.flora_held = {int(k): v for k, v in state.get("flora_held", {}).items()}
        self.totals = state["totals"]
        self.dp_history = {int(k): v for k, v in state.get("dp_history", {}).items()}
        self.dp_sigma = {int(k): v for k, v in state.get("dp_sigma", {}).items()}
        self.up_per_client_round = state["up_per_client_round"]
        self.rec = RunRecorder(self.run_dir, self.cfg.method, state["records"])
        set_rng_state(state["rng"])
        self.start_round = int(state["round"]) + 1
        log.info("resumed from round %d of %s", state["round"], self.run_dir)

    def finish(self, seconds: float) -> None:
        cfg = self.cfg
        adapter_dir = self.run_dir / "adapter"
        meta = {"method": cfg.method, "rank": cfg.rank, "scale": self.method.scale, "base_model": self.task.model_path,
                "task": cfg.task, "fingerprint": self.fingerprint, "label_names": self.task.data.label_names}
        save_fedsb_adapter(adapter_dir, self.model, meta)
        export_peft(adapter_dir / "peft", self.model, self.task.model_path, cfg.task)
        self.rec.plot()
        ev = self.rec.last("evaluate") or {}
        first = next((r for r in self.rec.records if r["phase"] == "evaluate"), {})
        up = self.up_per_client_round
        trainable = adapters.count_trainable(self.model)
        heads = sum(t.numel() for t in head_state(self.model).values())
        summary = {
            "method": cfg.method, "rounds": cfg.num_server_rounds, "final_accuracy": ev.get("accuracy"),
            "final_loss": ev.get("loss"), "initial_accuracy": first.get("accuracy"), "initial_loss": first.get("loss"),
            "final_perplexity": ev.get("perplexity"), "final_exact_match": ev.get("exact_match"),
            "initial_exact_match": first.get("exact_match"), "majority_rate": self.task.data.majority_rate(cfg.eval_max_samples) if cfg.task == "seq-cls" else None,
            "bytes_up_per_client_round": (sum(up) / len(up)) if up else None,
            "bytes_up_floor_per_client_round": 4 * self.method.get_vector(self.model).size,
            "bytes_up_total": self.totals["bytes_up"], "bytes_down_total": self.totals["bytes_down"],
            "bytes_basis_total": self.totals["bytes_basis_total"], "bytes_init_total": self.totals["bytes_init_total"],
            "trainable_params": trainable, "communicated_params": int(self.method.get_vector(self.model).size),
            "head_params": heads, "adapted_layers": len(self.task.layer_names), "fingerprint": self.fingerprint,
            "seconds": round(seconds, 2), "config": cfg.to_run_config(), "versions": versions(),
            "run_dir": str(self.run_dir), "secagg": cfg.secagg,
            "secagg_settings": {"shares": cfg.secagg_shares, "threshold": cfg.secagg_threshold,
                                "clip_range": cfg.secagg_clip_range, "quantization_range": cfg.secagg_quantization_range,
                                "modulus_range": 2**32} if cfg.secagg else None,
        }
        if cfg.dp:
            eps = self.epsilons()
            worst = max(eps, key=eps.get) if eps else None
            h = self.dp_history.get(worst, [])
            summary.update({
                "dp": True, "epsilon": eps.get(worst), "delta": self.dp_delta(), "accountant": cfg.accountant,
                "noise_multiplier": self.dp_sigma.get(worst), "max_grad_norm": cfg.max_grad_norm,
                "dp_history": [[h[i], h[i + 1], int(h[i + 2])] for i in range(0, len(h), 3)],
                "delta_rule": "target-delta" if cfg.target_delta > 0 else "1/(10 n) for the smallest client's n",
                "epsilon_per_client": {str(k): v for k, v in eps.items()},
            })
        self.rec.write_summary(summary)
        log.info("run complete: accuracy %s, loss %s; results in %s", ev.get("accuracy"), ev.get("loss"), self.run_dir)


class MeteredGrid:
    """A Grid that counts the bytes of every message it pushes and pulls (for the SecAgg+ workflow,
    which talks to the grid itself)."""

    def __init__(self, grid: Grid, totals: dict):
        self._grid, self._totals = grid, totals

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def push_messages(self, messages):
        messages = list(messages)
        self._totals["bytes_down"] += sum(nbytes(m.content) for m in messages if m.has_content())
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(self._grid.pull_messages(message_ids))
        self._totals["bytes_up"] += sum(nbytes(m.content) for m in replies if m.has_content())
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        ids = set(self.push_messages(messages))
        end, out = time.time() + (timeout if timeout is not None else 1e9), []
        while ids and time.time() < end:
            got = self.pull_messages(list(ids))
            out.extend(got)
            ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if ids:
                time.sleep(POLL_SECONDS)
        return out


def _arrays_of(reply: Message, key: str) -> dict[str, np.ndarray]:
    rec = reply.content.array_records.get(key) if hasattr(reply.content, "array_records") else reply.content[key]
    return {} if rec is None else {k: v.numpy() for k, v in rec.items()}


def _reject(node: int, e: Exception) -> dict:
    reason = getattr(e, "reason", "missing-key")
    log.warning("reply from node %d rejected (%s): %s", node, reason, e)
    return {"node": int(node), "reason": reason, "detail": str(e)}


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per log push otherwise
    cfg = FedSBConfig.from_run_config(context.run_config)
    FedSBServer(grid, cfg).run()
