"""``aggregation = "median" | "trimmed-mean"``: Flower's ``FedMedian`` and ``FedTrimmedAvg`` over a round's vectors.

Flower's robust strategies aggregate ``ArrayRecord`` replies, and a Fed-SB train reply is exactly one
``ArrayRecord({"adapter": vector})``: the round's validated vectors are handed to their ``aggregate_train`` as
such replies, so the rule that runs is Flower's own code. The vectors go in as float64 and the result comes back
as float32 (the wire dtype), so the result is the exact rule rounded once: bit-identical to fedsb's former
float64 median and trimmed mean (``tests/test_validation.py`` checks it against that formula).

Both rules need every vector of the round at once (as fedsb's did; the plain mean streams instead), are
unweighted, and run on the server inside a ServerApp: a ``Message`` is only built within a Flower run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg


def _no_metrics(contents, weighted_by_key):  # the round's metrics row is fedsb's own (server/rounds.py)
    return MetricRecord()


def flower_rule(aggregation: str, trim_fraction: float = 0.0) -> FedAvg:
    """The Flower strategy whose ``aggregate_train`` is the rule ``aggregation`` names."""
    if aggregation == "median":
        return FedMedian(train_metrics_aggr_fn=_no_metrics)
    if aggregation == "trimmed-mean":
        return FedTrimmedAvg(beta=float(trim_fraction), train_metrics_aggr_fn=_no_metrics)
    raise ValueError(f"no robust rule named {aggregation!r}; one of median, trimmed-mean")


def robust_combine(aggregation: str, vectors: Sequence[np.ndarray], trim_fraction: float = 0.0) -> np.ndarray:
    """The rule over ``vectors`` (one per valid reply, all of one shape; ValueError otherwise): float32."""
    if not len(vectors):
        raise ValueError("no vectors to aggregate")
    shapes = {np.shape(v) for v in vectors}
    if len(shapes) != 1:  # never broadcast a (1,) vector into the rest
        raise ValueError(f"vectors of different shapes: {sorted(shapes)}")
    rule = flower_rule(aggregation, trim_fraction)
    replies = [Message(RecordDict({"adapter": ArrayRecord({"adapter": Array(np.asarray(v, dtype=np.float64))}),
                                   "metrics": MetricRecord({"num-examples": 1})}), dst_node_id=0, message_type="train")
               for v in vectors]
    arrays, _ = rule.aggregate_train(0, replies)
    return arrays["adapter"].numpy().astype(np.float32)


__all__ = ["flower_rule", "robust_combine"]
