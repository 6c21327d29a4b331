"""``FedSBServer``: one Fed-SB run (DESIGN.md §2) driven over a Flower ``Grid``.

The public server-side API: a Flower user with their own ``ServerApp`` builds one with their grid, a
``FedSBConfig`` and, optionally, their own ``Task`` (model and data), and calls ``run()``. The loop:
wait for nodes, initialize (the basis protocol for methods that need one), train rounds, evaluate,
checkpoint, export. Rounds, transport, the basis protocol and DP live in their own modules.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsb import adapters
from fedsb.aggregation import robust
from fedsb.aggregation.validation import InvalidReply, check_num_examples
from fedsb.config import FedSBConfig
from fedsb.run.checkpoint import check_compatible
from fedsb.run.export import export_peft, head_state, save_fedsb_adapter
from fedsb.run.records import CHECKPOINT, RunRecorder, prepare_run_dir, versions
from fedsb.run.state import RunState
from fedsb.tasks import Task, get_task
from server.basis import BasisProtocol, reject
from server.dp import DPAccounting, RoundHook
from server.rounds import TrainRound, model_content, sample_nodes
from server.transport import Transport

log = logging.getLogger("fedsb.server")


class FedSBServer:
    """One run: wait for nodes, initialize, rounds, evaluate, checkpoint, export."""

    def __init__(self, grid: Grid, cfg: FedSBConfig, task: Task | None = None):
        self.grid, self.cfg = grid, cfg
        self.task = task or get_task(cfg)  # validates model, data, targets and rank before anything is sent
        self.run_dir = prepare_run_dir(cfg)  # after the task loaded: a bad model or dataset leaves no directory
        self.method = self.task.method()
        self.model = self.task.base_model()
        self.method.build(self.model, self.task.layer_names)
        self.rec = RunRecorder(self.run_dir, cfg.method)
        self.test_loader = self.task.loader(self.task.data.test_dataset(cfg.eval_max_samples), shuffle=False, batch_size=64)
        self.state = RunState(config=cfg.to_run_config())
        self.examples_of: dict[int, int] = {}
        self.rank_of: dict[int, int] = {}  # nested ranks: the rank each node trains at (from its hello)
        self.transport = Transport(grid, self.state.totals, cfg.round_timeout)
        self.basis = BasisProtocol(self) if self.method.needs_basis else None
        # what wraps every phase that reaches the clients (as Flower wraps strategies); chosen once here
        self.hooks: list[RoundHook] = [DPAccounting(cfg, self.state, lambda: self.examples_of)] if cfg.dp else []
        if cfg.secagg:
            from server.secagg import SecAggTrainRound

            self.round_type: type[TrainRound] = SecAggTrainRound
        else:
            self.round_type = TrainRound
        self.start_round = 1

    # ------------------------------------------------------------------------------------------
    def run(self) -> None:
        cfg, t0 = self.cfg, time.time()
        self.t0 = t0  # the run's clock: a resumed run goes on from the checkpointed seconds
        nodes = self.wait_for_nodes()
        if cfg.resume:
            self.restore()
            self.t0 -= self.state.totals.get("seconds", 0.0)
            self.hello(nodes)  # node ids are new after a restart; partitions are not
        else:
            self.hello(nodes)
            if self.basis is not None:
                self.basis.initialize(nodes)
            else:
                self.rec.log(0, "init", clients=len(nodes), bytes_up=0, bytes_down=0, seconds=round(time.time() - t0, 3))
            self.evaluate(0, time.time() - t0)
            self.checkpoint(0)
        for rnd in range(self.start_round, cfg.num_server_rounds + 1):
            self.round_type(self, rnd).run()
            if rnd % cfg.eval_every == 0 or rnd == cfg.num_server_rounds:
                self.evaluate(rnd)
                if cfg.federated_evaluate:
                    self.federated_evaluate(rnd)
            self.checkpoint(rnd)
        self.finish(time.time() - self.t0, time.time() - t0)

    # -- nodes ----------------------------------------------------------------------------------
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

    def hello(self, nodes: list[int]) -> None:
        """Ask every node for its partition id and size: sampling then follows partitions, not the
        (random) node ids, so a run (or a resumed run) is deterministic under its seed."""
        content = RecordDict({"config": ConfigRecord({"mode": "hello"})})

        def on_reply(node: int, reply: Message, up: int) -> None:
            if reply.has_error():
                log.warning("hello: node %d failed: %s", node, reply.error.reason)
                return
            m = reply.content["metrics"]
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

    def ordered(self, nodes) -> list[int]:
        return sorted(nodes, key=lambda n: self.state.partition_of.get(n, 10**9 + n))

    def sample(self, rnd: int) -> list[int]:
        nodes = self.wait_for_nodes(required=False)
        new = [n for n in nodes if n not in self.state.partition_of]
        if new:  # joined (or re-joined under a new id) since the hello: learn their partitions first
            self.hello(new)
        return sample_nodes(self.ordered(nodes), self.cfg.fraction_train, self.cfg.min_train_nodes, self.cfg.seed, rnd)

    def node_rank(self, node: int) -> int:
        return self.rank_of.get(node, self.cfg.rank)

    def forget_nodes(self, nodes: list[int], seed_failed: list[int] = ()) -> None:
        """These nodes lost their state (restart): send them the basis and the method's state again."""
        if self.basis is not None:
            self.basis.forget(nodes, seed_failed)
        for n in nodes:
            self.method.forget_node(n)

    # -- the hooks around every phase ----------------------------------------------------------------
    def hook_config(self, node: int) -> dict:
        return {k: v for h in self.hooks for k, v in h.node_config(node).items()}

    def observe(self, node: int, reply: Message) -> None:
        metrics = reply.content.metric_records.get("metrics")
        for h in self.hooks:
            if metrics is not None:
                h.observe(node, metrics)

    def hook_metrics(self) -> dict:
        return {k: v for h in self.hooks for k, v in h.round_metrics().items()}

    def combine(self, vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
        if self.cfg.aggregation == "median":
            return robust.coordinate_median(vectors)
        if self.cfg.aggregation == "trimmed-mean":
            return robust.trimmed_mean(vectors, self.cfg.trim_fraction)
        return robust.weighted_mean(vectors, weights)

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, rnd: int, seconds: float | None = None) -> dict:
        t0 = time.time()
        m = self.task.server_evaluate(self.model, self.test_loader)
        shown = {k: round(v, 4) for k, v in m.items() if k in ("accuracy", "perplexity", "exact_match") and v is not None}
        log.info("round %d: held-out loss %.4f %s", rnd, m["loss"], shown)
        return self.rec.log(rnd, "evaluate", loss=m["loss"], accuracy=m.get("accuracy"),
                            perplexity=m.get("perplexity"), exact_match=m.get("exact_match"),
                            examples=m["num-examples"], bytes_up=0, bytes_down=0,
                            clients=0, seconds=round((seconds or 0) + time.time() - t0, 3))

    def federated_evaluate(self, rnd: int) -> dict:
        """The sampled clients evaluate the global adapter on their local data (example-weighted)."""
        t0, totals = time.time(), self.state.totals
        down0, up0 = totals["bytes_down"], totals["bytes_up"]
        global_vec = self.method.get_vector(self.model)
        results: list[tuple[dict, int]] = []

        def on_reply(node: int, reply: Message, up: int) -> None:
            if reply.has_error() or reply.content.config_records.get("config", {}).get("status") != "ok":
                return
            m = dict(reply.content["metrics"])
            try:
                results.append((m, check_num_examples(m.get("num-examples"))))
            except InvalidReply as e:
                reject(node, e)

        self.transport.send(self.sample(rnd), MessageType.EVALUATE,
                            lambda n: model_content(self, n, rnd, global_vec)[0], "federated-evaluate", on_reply)
        total = sum(n for _, n in results)
        mean = (lambda k: robust.weighted_scalar_mean([(m[k], n) for m, n in results])
                if total and all(k in m for m, _ in results) else None)
        return self.rec.log(rnd, "federated-evaluate", loss=mean("loss"), accuracy=mean("accuracy"), clients=len(results),
                            examples=total, bytes_up=totals["bytes_up"] - up0,
                            bytes_down=totals["bytes_down"] - down0, seconds=round(time.time() - t0, 3))

    # -- checkpoint: the run state, written and read in one place -------------------------------------
    def checkpoint(self, rnd: int) -> None:
        s = self.state
        s.round, s.records = rnd, self.rec.records
        s.totals["seconds"] = round(time.time() - self.t0, 3)
        s.global_vec = self.method.get_vector(self.model)
        s.method_tensors, s.method_nodes = self.method.server_state(), self.method.node_state()
        s.to_checkpoint(self.run_dir / CHECKPOINT)

    def restore(self) -> None:
        state = RunState.from_checkpoint(self.run_dir / CHECKPOINT, tuple(self.method.node_state()))
        check_compatible(state.config, self.cfg.identity())
        state.config = self.cfg.to_run_config()
        totals = self.state.totals  # the transport meters into this dict: keep it, with the saved counts
        totals.update(state.totals)
        state.totals = totals
        self.state.__dict__.update(state.__dict__)  # keep the one RunState object the parts share
        if self.basis is not None and state.basis is not None:
            self.basis.restore(state.basis, state.fingerprint)
        self.method.load_server_state(self.model, state.method_tensors)
        self.method.load_node_state(state.method_nodes)
        self.method.set_vector(self.model, state.global_vec)
        self.rec = RunRecorder(self.run_dir, self.cfg.method, state.records)
        self.start_round = state.round + 1
        log.info("resumed from round %d of %s", state.round, self.run_dir)

    def one_time_per_client(self) -> float:
        """What one client pays once, before its cheap rounds: its init upload (mean over the asked
        clients) plus one basis download (mean over the nodes it was sent to)."""
        init = next((r for r in self.rec.records if r["phase"] == "init"), {})
        asked = init.get("accepted") or 0
        sends = self.state.totals.get("basis_sends", 0)
        return (self.state.totals["bytes_init_total"] / asked if asked else 0.0) + \
            (self.state.totals["bytes_basis_total"] / sends if sends else 0.0)

    # -- the end of the run -------------------------------------------------------------------------
    def finish(self, seconds: float, session_seconds: float) -> None:
        """``seconds``: the whole run (every session up to its last checkpoint); ``session_seconds``: this process's."""
        cfg, s = self.cfg, self.state
        adapter_dir = self.run_dir / "adapter"
        meta = {"method": cfg.method, "rank": cfg.rank, "scale": self.method.scale, "base_model": self.task.model_path,
                "task": cfg.task, "fingerprint": s.fingerprint, "label_names": self.task.data.label_names}
        save_fedsb_adapter(adapter_dir, self.model, meta)
        export_peft(adapter_dir / "peft", self.model, self.task.portable_model_name, self.task.peft_task_type)
        self.rec.plot()
        ev = self.rec.last("evaluate") or {}
        first = next((r for r in self.rec.records if r["phase"] == "evaluate"), {})
        up = s.up_per_client_round
        vec_size = int(self.method.get_vector(self.model).size)
        summary = {
            "method": cfg.method, "rounds": cfg.num_server_rounds, "final_accuracy": ev.get("accuracy"),
            "final_loss": ev.get("loss"), "initial_accuracy": first.get("accuracy"), "initial_loss": first.get("loss"),
            "final_perplexity": ev.get("perplexity"), "final_exact_match": ev.get("exact_match"),
            "initial_exact_match": first.get("exact_match"), "majority_rate": None, **self.task.summary(),
            "bytes_up_per_client_round": (sum(up) / len(up)) if up else None,
            "bytes_up_floor_per_client_round": 4 * vec_size,
            "bytes_up_total": s.totals["bytes_up"], "bytes_down_total": s.totals["bytes_down"],
            "bytes_basis_total": s.totals["bytes_basis_total"], "bytes_init_total": s.totals["bytes_init_total"],
            "bytes_one_time_per_client": self.one_time_per_client(),
            "trainable_params": adapters.count_trainable(self.model), "communicated_params": vec_size,
            "head_params": sum(t.numel() for t in head_state(self.model).values()),
            "adapted_layers": len(self.task.layer_names), "fingerprint": s.fingerprint,
            "rank_mix": {str(k): sorted(self.rank_of.values()).count(k) for k in sorted(set(self.rank_of.values()))},
            "seconds": round(seconds, 2), "seconds_this_session": round(session_seconds, 2), "config": cfg.to_run_config(), "versions": versions(),
            "run_dir": str(self.run_dir), "secagg": cfg.secagg,
            "secagg_settings": {"shares": cfg.secagg_shares, "threshold": cfg.secagg_threshold,
                                "clip_range": cfg.secagg_clip_range, "quantization_range": cfg.secagg_quantization_range,
                                "modulus_range": 2**32} if cfg.secagg else None,
        }
        for h in self.hooks:
            summary.update(h.summary())
        self.rec.write_summary(summary)
        log.info("run complete: accuracy %s, loss %s; results in %s", ev.get("accuracy"), ev.get("loss"), self.run_dir)
