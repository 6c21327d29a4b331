"""A round's bookkeeping: its quantized broadcast (``Broadcast``), each train reply validated and folded in as it
arrives (``RoundTally``), the round's metrics row, built in one place (``train_row``) for the plain and the SecAgg+ round, and the
federated evaluation's example-weighted means (``EvaluateTally``).
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Callable

import numpy as np
from flwr.app import Message

from fedsb.aggregation import robust
from fedsb.aggregation.validation import InvalidReply, ReplySpec, check_num_examples, check_reply
from fedsb.upload import codes_block, dequantize_update, quantize_update, rounding_generator
from server.basis import reject
from server.transport import arrays_of

log = logging.getLogger("fedsb.server")


class Broadcast:
    """download-dtype int8/int4: the round's global vector in codes, drawn once a round so every node gets the same
    bytes (a nested-rank node its block of them), and ``reference``, the vector they dequantize to.

    ``reference`` replaces the server's float32 global for the round: clients start from it and each upload is
    added to it, so the aggregate is exactly the mean of the clients' models and the method's maths is unchanged.
    The rounding error is unbiased and does not accumulate in a hidden state: clients and server hold the same
    values. The rounding noise is seeded by (seed, round) under DP too: the broadcast is post-processing of the
    already private global (the noised aggregate of earlier rounds), which no rounding noise can make less private,
    and a seeded one keeps a rerun identical."""

    def __init__(self, vec: np.ndarray, segments: list[int], dtype: str, seed: int, rnd: int):
        # spawn_key keeps this stream apart from the clients' upload streams, seeded by (seed, round, partition)
        rng = rounding_generator(np.random.SeedSequence([seed, rnd], spawn_key=(1,)))
        self.n, self.codes = vec.size, quantize_update(vec, segments, dtype, rng, name="adapter")
        self.reference = dequantize_update(self.codes, segments, name="adapter")

    @classmethod
    def of(cls, cfg, rnd: int, vec: np.ndarray, trainable: dict) -> Broadcast | None:
        """The round's broadcast under ``cfg.download_dtype`` (a segment per trainable tensor); None for float32."""
        if cfg.download_dtype == "float32":
            return None
        return cls(vec, [t.numel() for t in trainable.values()], cfg.download_dtype, cfg.seed, rnd)

    def arrays_for(self, index: np.ndarray | None) -> dict[str, np.ndarray]:
        """What a node whose part of the vector is ``index`` (``None``: all of it) is sent."""
        return codes_block(self.codes, self.n, index)


class RoundTally:
    """What a round has seen so far: the running sum (or the vectors), the weights, what was refused."""

    def __init__(self, rnd: int, global_vec: np.ndarray, streaming: bool, broadcast: Broadcast | None = None):
        # download-dtype int8/int4: the round's global is the broadcast's reference (``unquantized``: before it)
        self.rnd, self.streaming, self.broadcast, self.unquantized = rnd, streaming, broadcast, global_vec
        self.global_vec = global_vec if broadcast is None else broadcast.reference
        self.sampled: list[int] = []
        self.short_of = 0  # nodes the round lacked to reach min-available-nodes
        self.weights: list[float] = []
        self.rejected: list[dict] = []
        self.counts = {"failed": 0, "basis_resent": 0, "budget_exhausted": 0}
        self.losses: list[tuple[float, int]] = []
        self.up_sizes: list[float] = []
        self.peak_memory = 0  # the largest peak memory a client reported for its step
        self.timings: list[dict[str, float]] = []  # per reply: where the client's time went
        self.basis_bytes = 0
        # Plain FedAvg-style rules stream every reply into a running sum (server memory does not grow
        # with the number of clients), entry by entry, so nested-rank blocks average where they overlap;
        # FedEx/FLoRA and the robust rules need all vectors at once.
        self.running, self.vectors = robust.BlockWeightedMean(self.global_vec), []
        self.lacking: list[int] = []
        self.seed_failed: list[int] = []  # nodes that could not regenerate a random or weights basis
        self.upload_dtype = "float32"
        self.segments_for: Callable[[int], list[int]] | None = None  # set for int8/int4 uploads

    def add(self, node: int, reply: Message, up: int, spec_for: Callable[[int], tuple[np.ndarray | None, ReplySpec, np.ndarray]],
            observe: Callable[[int, Message], None]) -> None:
        """Fold in one reply: a failure, a node lacking the basis, a spent budget, a refused or a valid vector."""
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
        observe(node, reply)
        if status == "budget-exhausted":
            self.counts["budget_exhausted"] += 1
            log.info("round %d: node %d did not train: %s", self.rnd, node, reply.content["config"].get("reason", status))
            return
        index, spec, sent = spec_for(node)  # a block larger than the node's is refused
        try:
            got = arrays_of(reply, "adapter")
            if self.segments_for is not None:  # upload-dtype int8/int4: back to the vector it stands for
                got = {"adapter": decode_upload(got, self.segments_for(node), sent, self.upload_dtype)}
            n_ex = check_reply(spec, got, reply.content["metrics"].get("num-examples"),
                               reply.content["config"].get("fingerprint"), {"adapter": sent})
        except (InvalidReply, KeyError) as e:
            self.rejected.append(reject(node, e))
            return
        vec = got["adapter"]
        if self.streaming:
            self.running.add(vec, float(n_ex), index)
        else:
            self.vectors.append(vec)
        self.weights.append(float(n_ex))
        metrics = reply.content["metrics"]
        self.peak_memory = max(self.peak_memory, int(metrics.get("peak-memory-bytes", 0)))
        self.timings.append({k: float(v) for k, v in metrics.items() if k.startswith("time-") or k == "seconds"})
        if "train-loss" in metrics:  # absent under dp (not privatized, kept on the client)
            self.losses.append((float(metrics["train-loss"]), n_ex))
        self.up_sizes.append(up)


def decode_upload(got: dict[str, np.ndarray], segments: list[int], sent: np.ndarray, dtype: str) -> np.ndarray:
    """The vector an int8/int4 upload stands for (``sent`` plus the dequantized update), or ``InvalidReply``:
    the arrays' names, dtypes and shapes checked as any reply's, then their values (``dequantize_update``)."""
    n, codes = int(sum(segments)), "update_i8" if dtype == "int8" else "update_i4"
    specs = {codes: ReplySpec({codes: (n if dtype == "int8" else (n + 1) // 2,)}, np.int8 if dtype == "int8" else np.uint8),
             "update_scale": ReplySpec({"update_scale": (len(segments),)}, np.float32)}
    for key in got:
        if key not in specs:
            raise InvalidReply("extra-key", f"reply has unexpected {key!r} (expected {sorted(specs)})")
    for key, spec in specs.items():
        if key not in got:
            raise InvalidReply("missing-key", f"reply lacks {key!r} (expected {sorted(specs)})")
        check_reply(spec, {key: got[key]}, 1, None)
    try:
        delta = dequantize_update(got, segments)
    except ValueError as e:
        raise InvalidReply("quantization", str(e)) from None
    return (sent + delta).astype(np.float32)


def train_row(tally: RoundTally, updated: bool, bytes_up: int, bytes_down: int, hook_metrics: dict,
              **extra: Any) -> dict[str, Any]:
    """The metrics row of a train round (plain or SecAgg+; ``extra`` adds what only one of them knows)."""
    up_sizes, timings = tally.up_sizes, tally.timings
    row = {
        "loss": robust.weighted_scalar_mean(tally.losses),
        "clients": len(tally.sampled), "replies": len(tally.weights), "failed": tally.counts["failed"],
        "basis_resent": tally.counts["basis_resent"], "budget_exhausted": tally.counts["budget_exhausted"],
        **hook_metrics, "rejected": tally.rejected, "rejected_count": len(tally.rejected),
        "updated": updated, "examples": int(sum(tally.weights)),
        "bytes_up": bytes_up, "bytes_down": bytes_down, "bytes_basis": tally.basis_bytes,
        "bytes_up_per_client": (sum(up_sizes) / len(up_sizes)) if up_sizes else None,
        "client_peak_memory_bytes": tally.peak_memory or None,
        # median over the replies of where a client's time went: process age at the handler, config and
        # task load, model and basis, partition, local training
        "client_seconds": {k.removeprefix("time-"): round(statistics.median(t[k] for t in timings if k in t), 3)
                           for k in dict.fromkeys(k for t in timings for k in t)} or None,
        **extra,
    }
    if tally.short_of:
        row["short_of_nodes"] = tally.short_of
    return row


class EvaluateTally:
    """The clients' local evaluation of one round: valid replies, weighted by their examples."""

    def __init__(self, totals: dict):
        self.totals, self.t0 = totals, time.time()
        self.down0, self.up0 = totals["bytes_down"], totals["bytes_up"]
        self.results: list[tuple[dict, int]] = []

    def add(self, reply: Message) -> None:
        if reply.has_error() or reply.content.config_records.get("config", {}).get("status") != "ok":
            return
        m = dict(reply.content["metrics"])
        try:
            self.results.append((m, check_num_examples(m.get("num-examples"))))
        except InvalidReply as e:
            reject(reply.metadata.src_node_id, e)

    def row(self) -> dict[str, Any]:
        results, totals = self.results, self.totals
        total = sum(n for _, n in results)
        mean = (lambda k: robust.weighted_scalar_mean([(m[k], n) for m, n in results])
                if total and all(k in m for m, _ in results) else None)
        return dict(loss=mean("loss"), accuracy=mean("accuracy"), clients=len(results), examples=total,
                    bytes_up=totals["bytes_up"] - self.up0, bytes_down=totals["bytes_down"] - self.down0,
                    seconds=round(time.time() - self.t0, 3))
