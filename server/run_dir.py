"""What ``FedSB.start()`` adds to Flower's strategy loop: the run directory (metrics.jsonl, summary.json,
the checkpoint of every round, resume, the fedsb and PEFT exports), and rounds whose replies stream in.

The rounds never write here: each phase hands its metrics row to the strategy (``FedSB.report``) and
``run`` moves them to the run directory after the phase.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (DifferentialPrivacyServerSideAdaptiveClipping,
                                     DifferentialPrivacyServerSideFixedClipping, Result, Strategy)

from fedsb import adapters
from fedsb.config import ConfigError
from fedsb.run.checkpoint import check_compatible
from fedsb.run.export import export_run, head_state
from fedsb.run.records import CHECKPOINT, RunRecorder, lock_run_dir, prepare_run_dir, versions
from fedsb.run.state import RunState

log = logging.getLogger("fedsb.server")


class RunDirectory:
    """The run directory of one ``server.strategy.FedSB`` (given, not imported: its ``start`` imports this)."""

    def __init__(self, strategy: Strategy, outer: Strategy | None = None):
        self.strategy, self.cfg = strategy, strategy.cfg
        self.outer = outer or strategy  # the strategy the rounds go through: FedSB itself or a wrapper of it
        self.path = prepare_run_dir(self.cfg)  # the strategy loaded its task first: a bad model or dataset leaves no directory
        self.lock = lock_run_dir(self.path)  # one writer: refused while another ServerApp writes here
        self.rec = RunRecorder(self.path, self.cfg.method)
        self.t0 = time.time()  # the run's clock: a resumed run goes on from the checkpointed seconds

    def close(self) -> None:
        """Release the run directory (the process's end releases it too)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def flush(self) -> None:
        """Write the rows the strategy reported since the last flush."""
        rows, self.strategy.rows = self.strategy.rows, []
        for rnd, phase, row in rows:
            self.rec.log(rnd, phase, **row)

    # -- checkpoint: the run state, written and read in one place -------------------------------------
    def checkpoint(self, rnd: int) -> None:
        self.flush()
        st, s = self.strategy, self.strategy.state
        s.round = rnd  # (the metrics history is in metrics.jsonl, already written and fsynced)
        s.totals["seconds"] = round(time.time() - self.t0, 3)
        s.global_vec = st.method.get_vector(st.model)
        s.method_tensors, s.method_nodes = st.method.server_state(), st.method.node_state()
        s.wrapper_tensors = {f"{depth}.{k}": torch.from_numpy(np.ascontiguousarray(x))
                             for depth, w in self.wrappers() for k, x in w.server_state().items()}
        s.to_checkpoint(self.path / CHECKPOINT)

    def wrappers(self) -> list[tuple[int, Strategy]]:
        """The wrappers between ``outer`` and FedSB (outermost is depth 0) that keep state across rounds
        (``server_state``/``load_server_state``, e.g. ``server.fedopt.ServerAdam``'s moments)."""
        return [(depth, s) for depth, s in wrapper_chain(self.strategy, self.outer) if hasattr(s, "server_state")]

    def restore(self) -> int:
        """Load the checkpoint into the strategy's state (the parts share that one object); returns the
        round to continue from."""
        st = self.strategy
        state = RunState.from_checkpoint(self.path / CHECKPOINT, tuple(st.method.node_state()))
        check_compatible(state.config, self.cfg.identity())
        state.config = self.cfg.to_run_config()
        st.state.totals.update(state.totals)  # the meters count into this dict: keep it, with the saved counts
        for f in dataclasses.fields(RunState):
            if f.name != "totals":
                setattr(st.state, f.name, getattr(state, f.name))
        if st.basis is not None and state.basis is not None:
            st.basis.restore(state.basis, state.fingerprint)
        st.method.load_server_state(st.model, state.method_tensors)
        st.method.load_node_state(state.method_nodes)
        st.method.set_vector(st.model, state.global_vec)
        self.restore_wrappers(state.wrapper_tensors)
        self.rec = RunRecorder.resume(self.path, self.cfg.method, state.round)
        self.t0 -= st.state.totals.get("seconds", 0.0)
        log.info("resumed from round %d of %s", state.round, self.path)
        return state.round + 1

    def restore_wrappers(self, tensors: dict[str, torch.Tensor]) -> None:
        """Each wrapper's state as ``checkpoint`` wrote it; a wrapper's state that this run has no wrapper for
        is an error (resumed without the ServerAdam it started with, say), not state silently dropped."""
        wrappers = self.wrappers()
        orphans = {k.split(".", 1)[0] for k in tensors} - {str(depth) for depth, _ in wrappers}
        if orphans:
            raise ValueError(f"resume: the checkpoint holds the state of a strategy wrapping FedSB at depth "
                             f"{sorted(orphans)} (e.g. ServerAdam's moments) that this run lacks; resume with the "
                             "same strategies the run started with")
        for depth, w in wrappers:  # (nothing yet, after round 0: a server optimizer has taken no step)
            w.load_server_state({k.split(".", 1)[1]: v.numpy() for k, v in tensors.items()
                                 if k.split(".", 1)[0] == str(depth)})

    # -- the end of the run -------------------------------------------------------------------------
    def one_time_per_client(self) -> float:
        """What one client pays once, before its cheap rounds: its init upload (mean over the asked
        clients) plus one basis download (mean over the nodes it was sent to)."""
        totals = self.strategy.state.totals
        init = next((r for r in self.rec.records if r["phase"] == "init"), {})
        asked = init.get("accepted") or 0
        sends = totals.get("basis_sends", 0)
        return (totals["bytes_init_total"] / asked if asked else 0.0) + \
            (totals["bytes_basis_total"] / sends if sends else 0.0)

    def finish(self, session_seconds: float) -> dict:
        """``session_seconds``: this process's time; the summary's ``seconds`` is the whole run (every session)."""
        self.flush()
        st, cfg, s = self.strategy, self.cfg, self.strategy.state
        task, model, method = st.task, st.model, st.method
        adapter_dir = self.path / "adapter"
        meta = {"method": cfg.method, "rank": cfg.rank, "scale": method.scale, "base_model": task.model_path,
                "task": cfg.task, "fingerprint": s.fingerprint, "label_names": task.data.label_names}
        export_run(adapter_dir, model, method, task, meta)
        self.rec.plot()
        ev = self.rec.last("evaluate") or {}
        first = next((r for r in self.rec.records if r["phase"] == "evaluate"), {})
        up = s.up_per_client_round
        vec_size = int(method.get_vector(model).size)
        ranks = sorted(st.nodes.rank_of.values())
        summary = {
            "method": cfg.method, "rounds": cfg.num_server_rounds, "final_accuracy": ev.get("accuracy"),
            "final_loss": ev.get("loss"), "initial_accuracy": first.get("accuracy"), "initial_loss": first.get("loss"),
            "final_perplexity": ev.get("perplexity"), "final_exact_match": ev.get("exact_match"),
            "initial_exact_match": first.get("exact_match"), "majority_rate": None, **task.summary(),
            "bytes_up_per_client_round": (sum(up) / len(up)) if up else None,
            "bytes_up_floor_per_client_round": 4 * vec_size,
            "bytes_up_total": s.totals["bytes_up"], "bytes_down_total": s.totals["bytes_down"],
            "bytes_basis_total": s.totals["bytes_basis_total"], "bytes_init_total": s.totals["bytes_init_total"],
            "bytes_one_time_per_client": self.one_time_per_client(),
            "trainable_params": adapters.count_trainable(model), "communicated_params": vec_size,
            "head_params": sum(t.numel() for t in head_state(model).values()),
            "adapted_layers": len(task.layer_names), "fingerprint": s.fingerprint,
            "rank_mix": {str(k): ranks.count(k) for k in sorted(set(ranks))},
            # each node's training examples as it said in its hello (its own file less its held-out slice), by
            # partition id: node ids are random in every run, partition ids are not
            "node_train_examples": sorted([{"partition-id": s.partition_of.get(n), "train_examples": k}
                                           for n, k in st.nodes.examples_of.items()],
                                          key=lambda e: (e["partition-id"], e["train_examples"])),
            "refused_nodes": list(st.nodes.refused.values()),  # nodes whose model was not the run's: never sampled
            "seconds": round(time.time() - self.t0, 2), "seconds_this_session": round(session_seconds, 2),
            "config": cfg.to_run_config(), "versions": versions(),
            "run_dir": str(self.path), "secagg": cfg.secagg,
            "secagg_settings": {"shares": cfg.secagg_shares, "threshold": cfg.secagg_threshold,
                                "clip_range": cfg.secagg_clip_range, "quantization_range": cfg.secagg_quantization_range,
                                "modulus_range": 2**32} if cfg.secagg else None,
            **st.hooks.summary(), **(st.basis.fallback() if st.basis is not None else {}),
        }
        self.rec.write_summary(summary)
        log.info("run complete: accuracy %s, loss %s; results in %s", ev.get("accuracy"), ev.get("loss"), self.path)
        return summary


def train_round(st: Strategy, outer: Strategy, rnd: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
    """One round through ``outer``'s hooks, its replies streamed into ``aggregate_train``; a node that
    lost the basis is sent it again, in the same round, after the others replied."""
    messages = outer.configure_train(rnd, arrays, config, grid)

    def replies():
        yield from st.transport.stream(messages, "train")
        st.tally.counts["failed"] += len(st.transport.timed_out)
        again = st.resend() if st.tally.lacking else []
        if again:
            yield from st.transport.stream(st.train_messages(again, config=config), "train")
            st.tally.counts["failed"] += len(st.transport.timed_out)

    # a wrapper that reads the replies more than once (Flower's DP wrappers count them first) gets a list
    return outer.aggregate_train(rnd, replies() if getattr(outer, "streams_replies", False) else list(replies()))


def federated_evaluate(st: Strategy, outer: Strategy, rnd: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                       result: Result) -> None:
    messages = outer.configure_evaluate(rnd, arrays, config, grid)
    replies = st.transport.stream(messages, "federated-evaluate")
    metrics = outer.aggregate_evaluate(rnd, replies if getattr(outer, "streams_replies", False) else list(replies))
    if metrics is not None:
        result.evaluate_metrics_clientapp[rnd] = metrics


def wrapper_chain(st: Strategy, outer: Strategy):
    """(depth, wrapper) for each strategy between ``outer`` (depth 0) and FedSB ``st``, outermost first."""
    s, depth = outer, 0
    while s is not st and s is not None:
        yield depth, s
        s, depth = getattr(s, "strategy", None), depth + 1  # Flower's wrappers hold theirs in .strategy too


def check_wrappers(st: Strategy, outer: Strategy) -> None:
    """Flower's server-side DP wrappers clip each reply's arrays against the global arrays before the strategy
    sees them; an int8/int4 upload (codes and scales, decoded by FedSB) is not such an array, and clipping codes
    would not clip the update: refused before anything starts, naming the key."""
    clips = (DifferentialPrivacyServerSideFixedClipping, DifferentialPrivacyServerSideAdaptiveClipping)
    for _, s in wrapper_chain(st, outer):
        if isinstance(s, clips) and st.cfg.upload_dtype != "float32":
            raise ConfigError("upload-dtype", f"got {st.cfg.upload_dtype!r} inside Flower's {type(s).__name__}, "
                              "which clips each reply's arrays as they arrive; set upload-dtype='float32'")


def run(st: Strategy, outer: Strategy, grid: Grid, num_rounds: int, timeout: float | None, train_config: ConfigRecord,
        evaluate_config: ConfigRecord, evaluate_fn) -> Result:
    check_wrappers(st, outer)
    cfg, t0, result = st.cfg, time.time(), Result()
    if timeout is not None:
        st.transport.timeout = timeout
    st.connect(grid)
    rundir = RunDirectory(st, outer)
    try:
        start_round = 1
        if cfg.resume:
            start_round = rundir.restore()
            st.nodes.hello(st.nodes.wait())  # node ids are new after a restart; partitions are not
            st.initialized = True
        else:
            st.initialize(grid)
            if st.federated_only:  # the nodes' held-out slices give the initial accuracy too
                federated_evaluate(st, outer, 0, st.global_arrays(), evaluate_config, grid, result)
            else:
                st.evaluate(0, seconds=time.time() - t0)
            if evaluate_fn:
                evaluate_fn(0, st.global_arrays())
            rundir.checkpoint(0)
        arrays = st.global_arrays()
        for rnd in range(start_round, num_rounds + 1):
            new, metrics = train_round(st, outer, rnd, arrays, train_config, grid)
            if new is not None:
                arrays = result.arrays = new
                if outer is not st and st.fits(new):  # a wrapper's aggregate (a ServerAdam step, DP noise), not
                    st.set_global(new)  # FedSB's own: what this round's checkpoint and the export hold, evaluated or not
            if metrics is not None:
                result.train_metrics_clientapp[rnd] = metrics
            if rnd % cfg.eval_every == 0 or rnd == num_rounds:
                if not st.federated_only:
                    result.evaluate_metrics_serverapp[rnd] = st.evaluate(rnd, arrays)
                if evaluate_fn:
                    evaluate_fn(rnd, arrays)
                if cfg.federated_evaluate or st.federated_only:
                    federated_evaluate(st, outer, rnd, arrays, evaluate_config, grid, result)
            rundir.checkpoint(rnd)
        result.arrays = arrays
        rundir.finish(time.time() - t0)
    finally:
        rundir.close()
    return result
