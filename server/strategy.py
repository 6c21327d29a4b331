"""``FedSB``: Fed-SB (and the baselines, through their ``Method``) as a Flower message-API ``Strategy``.

The global ``arrays`` a round receives and returns are exactly what replies carry: one flat float32
vector (R and the head for Fed-SB) under ``"adapter"``. The basis B, A travels in another record of the
outbound message, only to nodes that lack its fingerprint. The protocol lives in the hooks: the first
``configure_train`` greets the nodes and runs the initialization query (it receives the grid), so a
wrapped ``FedSB`` (Flower's DP wrappers, ``server.dp.DPAccounting``) runs it through the wrapper's loop.

``start()`` adds what Flower's loop lacks (``server.run_dir``): the run directory, checkpoints, resume,
the PEFT export and the summary; it also streams each round's replies (one in memory at a time, metered
byte for byte) into ``aggregate_train`` and sends the basis again, in the same round, to a node that lost it.
"""

from __future__ import annotations

import logging
import os
import time
import tracemalloc
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedsb.aggregation import robust
from fedsb.aggregation.validation import ReplySpec
from fedsb.config import FedSBConfig
from fedsb.methods import method_for
from fedsb.run.state import RunState
from fedsb.tasks import Task, get_task
from fedsb.wire import MESSAGE_CONFIG_DEFAULTS
from server.basis import BasisProtocol
from server.hooks import PhaseHooks
from server.nodes import Nodes
from server.robust import robust_combine
from server.rounds import Broadcast, EvaluateTally, RoundTally, train_row
from server.transport import Transport, arrays, nbytes

log = logging.getLogger("fedsb.server")
TRACE_MEMORY = os.environ.get("FEDSB_TRACE_MEMORY") == "1"  # bench.scale: the server's peak memory per round


def vector_of(record: ArrayRecord) -> np.ndarray:
    return record["adapter"].numpy()


class FedSB(Strategy):
    """One federated fine-tuning run of ``cfg.method`` on ``task`` (by default the config's task)."""

    streams_replies = True  # aggregate_train reads its replies once, as they arrive

    def __init__(self, cfg: FedSBConfig, task: Task | None = None):
        self.cfg = cfg
        self.task = task or get_task(cfg)  # validates model, data, targets and rank before anything is sent
        self.method = method_for(cfg)
        self.model = self.task.base_model()
        self.method.build(self.model, self.task.layer_names)
        self.state = RunState(config=cfg.to_run_config())
        self.hooks = PhaseHooks()
        self.transport = Transport(None, self.state.totals, cfg.round_timeout)
        self.nodes = Nodes(cfg, self.state, self.transport, model_id=self.task.model_id)
        self.basis = (BasisProtocol(cfg, self.task, self.model, self.state, self.transport, self.nodes, self.hooks)
                      if self.method.needs_basis else None)
        self.rows: list[tuple[int, str, dict]] = []  # metrics rows not yet reported (start() drains them)
        self.initialized = False
        self.tally: RoundTally | None = None
        # dataset='none' without eval-dataset: the server has nothing to evaluate on; the nodes' held-out
        # slices do it (federated evaluation), and their example-weighted mean is the run's evaluate row
        self.federated_only = cfg.dataset == "none" and not cfg.eval_dataset

    # -- the global arrays --------------------------------------------------------------------------
    def global_arrays(self) -> ArrayRecord:
        return arrays(adapter=self.method.get_vector(self.model))

    def sent_arrays(self) -> ArrayRecord | None:  # download-dtype int8/int4: the round's broadcast, dequantized
        return arrays(adapter=self.tally.global_vec) if self.tally and self.tally.broadcast else None

    def set_global(self, record: ArrayRecord) -> np.ndarray:
        """Put ``record`` into the server's model and return the global vector as the model holds it."""
        self.method.set_vector(self.model, vector_of(record))
        return self.method.get_vector(self.model)

    def report(self, rnd: int, phase: str, row: dict) -> dict:
        self.rows.append((rnd, phase, row))
        return row

    # -- before the first round: greet the nodes, fix the basis -----------------------------------------
    def connect(self, grid: Grid) -> None:
        self.transport.grid = grid

    def initialize(self, grid: Grid) -> None:
        """Greet the nodes; for a method with a basis, run the init query (or fix it from a seed or the
        server's data). Runs once, from the first ``configure_train`` or from ``start()``."""
        if self.initialized:
            return
        self.connect(grid)
        t0, nodes = time.time(), self.nodes.wait()
        self.nodes.hello(nodes)
        eligible = self.nodes.ordered(nodes)  # less those refused for another model
        if nodes and not eligible:
            raise RuntimeError("every connected node was refused: none holds the run's model (see the errors above)")
        nodes = eligible
        if self.basis is not None:
            self.report(0, "init", self.basis.initialize(nodes))
        else:
            self.report(0, "init", dict(clients=len(nodes), bytes_up=0, bytes_down=0, seconds=round(time.time() - t0, 3)))
        self.initialized = True

    # -- train ----------------------------------------------------------------------------------------
    def message_config(self, node: int, rnd: int) -> dict:
        """The config of a train/evaluate message: round and basis, then the method's and the hooks' entries."""
        k = self.nodes.rank(node)
        fingerprint = self.basis.fingerprint_for(node) if self.basis is not None else ""
        return {"round": rnd, "fingerprint": fingerprint, **MESSAGE_CONFIG_DEFAULTS, **self.method.round_config(),
                **({"rank": k} if k != self.cfg.rank else {}), **self.hooks.config(node)}

    def node_view(self, node: int, global_vec: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(positions, values) of the part of the global vector ``node`` trains: all of it, or its nested block."""
        index = self.method.block_index(self.model, self.nodes.rank(node))
        return index, (global_vec if index is None else global_vec[index])

    def model_content(self, node: int, rnd: int, global_vec: np.ndarray, config: ConfigRecord | None = None,
                      broadcast: Broadcast | None = None) -> tuple[RecordDict, int]:
        """A train/evaluate message for ``node``: its part of the global vector (or of ``broadcast``'s codes),
        config, the basis if the node lacks it, the method's extra download; with the bytes the basis added."""
        entries = {**(dict(config) if config else {}), **self.message_config(node, rnd)}
        index, view = self.node_view(node, global_vec)
        rd = RecordDict({"adapter": arrays(**broadcast.arrays_for(index)) if broadcast else arrays(adapter=view),
                         "config": ConfigRecord(entries)})
        basis_bytes = self.basis.attach(node, rd) if self.basis is not None else 0
        extra = self.method.extra_download(node)
        if extra:
            rd["extra"] = arrays(**extra)
        return rd, basis_bytes

    def train_messages(self, nodes: list[int], config: ConfigRecord | None = None) -> Iterator[Message]:
        """Built one at a time as the transport pushes them (each carries its own copy of the vector)."""
        tally = self.tally
        for n in nodes:
            rd, added = self.model_content(n, tally.rnd, tally.global_vec, config, tally.broadcast)
            tally.basis_bytes += added
            yield self.metered(Message(rd, dst_node_id=int(n), message_type=MessageType.TRAIN))

    def metered(self, msg: Message) -> Message:
        """Count a message's bytes as it is built: the metering holds under any loop that sends it."""
        self.state.totals["bytes_down"] += nbytes(msg.content)
        return msg

    def begin_round(self, rnd: int, arrays_in: ArrayRecord, grid: Grid) -> RoundTally:
        """Initialize on the first call; the global vector into the model; the round's sample. Arrays
        given before the basis existed (Flower's loop passes its ``initial_arrays`` to round 1) are
        replaced by the model's own vector, R0 from the init."""
        if TRACE_MEMORY:
            tracemalloc.start() if not tracemalloc.is_tracing() else tracemalloc.reset_peak()
        fresh = not self.initialized
        self.initialize(grid)
        self.connect(grid)
        global_vec = self.method.get_vector(self.model) if fresh else self.set_global(arrays_in)
        streaming = self.method.streamable and self.cfg.aggregation == "mean"
        broadcast = Broadcast.of(self.cfg, rnd, global_vec, self.method.trainable(self.model))  # None: float32
        if broadcast is not None:  # the dequantized broadcast becomes the round's global
            self.method.set_vector(self.model, broadcast.reference)
        tally = self.tally = RoundTally(rnd, global_vec, streaming, broadcast)
        if self.cfg.upload_dtype != "float32":
            tally.upload_dtype, tally.segments_for = self.cfg.upload_dtype, self.upload_segments
        tally.t0, totals = time.time(), self.state.totals
        tally.down0, tally.up0, tally.basis0 = totals["bytes_down"], totals["bytes_up"], totals["bytes_basis_total"]
        tally.mem0 = tracemalloc.get_traced_memory()[0] if TRACE_MEMORY else 0
        nodes = self.nodes.connected()
        tally.short_of = self.nodes.short_of(nodes)
        tally.sampled = self.nodes.sample(rnd, nodes)
        return tally

    def fits(self, record: ArrayRecord) -> bool:
        """Whether ``record`` is a global vector of this model."""
        return "adapter" in record and vector_of(record).shape == self.method.get_vector(self.model).shape

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        tally = self.begin_round(server_round, arrays, grid)
        return self.train_messages(tally.sampled, config=config)

    def reply_spec(self, node: int) -> tuple[np.ndarray | None, ReplySpec, np.ndarray]:
        index, sent = self.node_view(node, self.tally.global_vec)
        spec = ReplySpec(shapes={"adapter": sent.shape}, max_update_norm=self.cfg.max_update_norm,
                         fingerprint=self.basis.fingerprint_for(node) if self.basis else None,
                         max_num_examples=self.cfg.max_num_examples)
        return index, spec, sent

    def upload_segments(self, node: int) -> list[int]:
        """The sizes of ``node``'s trainable tensors (its nested block's part of each): how its client cut
        a quantized upload into scaled segments."""
        sizes = [t.numel() for t in self.method.trainable(self.model).values()]
        index = self.method.block_index(self.model, self.nodes.rank(node))
        if index is None:
            return sizes
        return np.bincount(np.searchsorted(np.cumsum(sizes), index, side="right"), minlength=len(sizes)).tolist()

    def take(self, reply: Message) -> None:
        """Fold one train reply into the round (validated as it arrives)."""
        up = 0 if reply.has_error() else nbytes(reply.content)
        self.state.totals["bytes_up"] += up
        self.tally.add(reply.metadata.src_node_id, reply, up, self.reply_spec, self.hooks.observe)

    def forget_nodes(self, nodes: list[int], seed_failed: list[int] = ()) -> None:
        """These nodes lost their state (restart): send them the basis and the method's state again."""
        if self.basis is not None:
            self.basis.forget(nodes, seed_failed)
        for n in nodes:
            self.method.forget_node(n)

    def resend(self) -> list[int]:
        """Nodes of this round that lack the basis: forgotten, so their next message carries it again."""
        again, self.tally.lacking = list(self.tally.lacking), []
        if again:
            log.info("round %d: re-sending the basis to %d node(s) that lack it", self.tally.rnd, len(again))
            self.forget_nodes(again, self.tally.seed_failed)
            self.tally.counts["basis_resent"] += len(again)
        return again

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        tally = self.tally
        for reply in replies:
            self.take(reply)
        if tally.lacking:  # under another loop than start()'s: their next round brings them the basis
            self.resend()
        new = self.sum_replies()
        if new is not None:
            self.method.set_vector(self.model, new)
            self.method.after_round(self.model, server_round)
        else:
            log.warning("round %d: %d valid replies < min-train-nodes=%d; keeping the previous adapter",
                        server_round, len(tally.weights), self.cfg.min_train_nodes)
            self.method.set_vector(self.model, tally.unquantized)  # as before the broadcast (download-dtype)
        row = self.finish_round(new is not None)
        return (self.global_arrays() if new is not None else None), scalar_metrics(row)

    def sum_replies(self) -> np.ndarray | None:
        tally = self.tally
        if len(tally.weights) < self.cfg.min_train_nodes:
            return None
        if tally.streaming:
            return tally.running.result()
        return self.method.aggregate(self.model, tally.vectors, tally.weights, self.combine)

    def combine(self, vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
        if (c := self.cfg).aggregation != "mean":  # Flower's FedMedian / FedTrimmedAvg / MultiKrum
            return robust_combine(c.aggregation, vectors, c.trim_fraction, c.malicious_nodes, c.krum_select)
        return robust.weighted_mean(vectors, weights)

    def finish_round(self, updated: bool, **extra) -> dict:
        tally, totals = self.tally, self.state.totals
        totals["bytes_basis_total"] = tally.basis0 + tally.basis_bytes
        self.state.up_per_client_round.extend(tally.up_sizes)
        row = train_row(tally, updated, totals["bytes_up"] - tally.up0, totals["bytes_down"] - tally.down0,
                        self.hooks.metrics(), **extra)
        row["seconds"] = round(time.time() - tally.t0, 3)
        if TRACE_MEMORY:
            row["server_peak_bytes"] = tracemalloc.get_traced_memory()[1] - tally.mem0
        return self.report(tally.rnd, "train", row)

    # -- evaluate -------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, rnd: int, record: ArrayRecord | None = None, seconds: float = 0.0) -> MetricRecord:
        """Centralized evaluation on the task's held-out split (Flower's ``evaluate_fn`` signature)."""
        t0 = time.time()
        if record is not None and self.fits(record):
            self.set_global(record)
        if not hasattr(self, "test_loader"):
            self.test_loader = self.task.loader(self.task.data.test_dataset(self.cfg.eval_max_samples),
                                                shuffle=False, batch_size=64)
        m = self.task.server_evaluate(self.model, self.test_loader)
        shown = {k: round(v, 4) for k, v in m.items() if k in ("accuracy", "perplexity", "exact_match") and v is not None}
        log.info("round %d: held-out loss %.4f %s", rnd, m["loss"], shown)
        row = self.report(rnd, "evaluate", dict(
            loss=m["loss"], accuracy=m.get("accuracy"), perplexity=m.get("perplexity"), exact_match=m.get("exact_match"),
            examples=m["num-examples"], bytes_up=0, bytes_down=0, clients=0, seconds=round(seconds + time.time() - t0, 3)))
        return scalar_metrics(row)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        """Federated evaluation: nodes that did not train this round (``Nodes.evaluation_sample``) evaluate
        the global adapter on their local held-out data."""
        if not (self.cfg.federated_evaluate or self.federated_only):
            return []
        self.connect(grid)
        global_vec = self.set_global(arrays) if self.fits(arrays) else self.method.get_vector(self.model)
        self.eval_tally = EvaluateTally(self.state.totals)
        trained = self.tally.sampled if self.tally is not None and self.tally.rnd == server_round else []
        nodes = self.nodes.evaluation_sample(server_round, self.nodes.connected(), trained)
        return (self.evaluate_message(n, server_round, global_vec, config) for n in nodes)

    def evaluate_message(self, node: int, rnd: int, global_vec: np.ndarray, config: ConfigRecord | None) -> Message:
        rd, added = self.model_content(node, rnd, global_vec, config)
        self.state.totals["bytes_basis_total"] += added  # a node's first message may be an evaluation
        return self.metered(Message(rd, dst_node_id=int(node), message_type=MessageType.EVALUATE))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if not (self.cfg.federated_evaluate or self.federated_only):
            return None
        for reply in replies:
            self.state.totals["bytes_up"] += 0 if reply.has_error() else nbytes(reply.content)
            self.eval_tally.add(reply)
        phase = "evaluate" if self.federated_only else "federated-evaluate"
        return scalar_metrics(self.report(server_round, phase, self.eval_tally.row()))

    def summary(self) -> None:
        log.info("\t├──> FedSB settings: method=%s rank=%d aggregation=%s secagg=%s dp=%s", self.cfg.method,
                 self.cfg.rank, self.cfg.aggregation, self.cfg.secagg, self.cfg.dp)

    # -- the run --------------------------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn=None, outer: Strategy | None = None) -> Result:
        """The whole run, reported to the run directory (``server.run_dir.run``); ``outer`` is the
        wrapper whose hooks the rounds go through (a wrapper's own ``start`` passes itself)."""
        from server.run_dir import run

        return run(self, outer or self, grid, num_rounds or self.cfg.num_server_rounds, timeout,
                   train_config or ConfigRecord(), evaluate_config or ConfigRecord(), evaluate_fn)


def scalar_metrics(row: dict) -> MetricRecord:
    """The numbers of a metrics row, as Flower's ``MetricRecord`` (the row itself goes to metrics.jsonl)."""
    return MetricRecord({k: (float(v) if isinstance(v, float) else int(v)) for k, v in row.items()
                         if isinstance(v, (int, float)) and v is not None})
