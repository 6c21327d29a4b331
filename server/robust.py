"""``aggregation = "median" | "trimmed-mean" | "krum"``: Flower's ``FedMedian``, ``FedTrimmedAvg`` and ``MultiKrum``
over a round's vectors.

Flower's robust strategies aggregate ``ArrayRecord`` replies, and a Fed-SB train reply is exactly one
``ArrayRecord({"adapter": vector})``: the round's validated vectors are handed to their ``aggregate_train`` as
such replies, so the rule that runs is Flower's own code. The vectors go in as float64 and the result comes back
as float32 (the wire dtype), so the result is the exact rule rounded once: bit-identical to fedsb's former
float64 median and trimmed mean (``tests/test_validation.py`` checks it against that formula).

Krum (Blanchard et al. 2017) keeps the reply whose summed squared distance to its n − f − 2 nearest others is
smallest (``malicious-nodes`` = f); Multi-Krum (``krum-select`` = m > 1) averages the m lowest-scored ones. For
Fed-SB the distance between two R vectors is the distance between their updates B·R·A themselves, because B has
orthonormal columns and A orthonormal rows (both are truncated-SVD factors): ‖B(R₁−R₂)A‖_F = ‖R₁−R₂‖_F. For a
baseline that sends its LoRA factors, Krum measures the factors, not the products.

The rules need every vector of the round at once (as fedsb's did; the plain mean streams instead), are
unweighted, and run on the server inside a ServerApp: a ``Message`` is only built within a Flower run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, MultiKrum


def _no_metrics(contents, weighted_by_key):  # the round's metrics row is fedsb's own (server/rounds.py)
    return MetricRecord()


def flower_rule(aggregation: str, trim_fraction: float = 0.0, malicious_nodes: int = 0, krum_select: int = 1) -> FedAvg:
    """The Flower strategy whose ``aggregate_train`` is the rule ``aggregation`` names."""
    if aggregation == "median":
        return FedMedian(train_metrics_aggr_fn=_no_metrics)
    if aggregation == "trimmed-mean":
        return FedTrimmedAvg(beta=float(trim_fraction), train_metrics_aggr_fn=_no_metrics)
    if aggregation == "krum":
        return MultiKrum(num_malicious_nodes=int(malicious_nodes), num_nodes_to_select=int(krum_select),
                         train_metrics_aggr_fn=_no_metrics)
    raise ValueError(f"no robust rule named {aggregation!r}; one of median, trimmed-mean, krum")


def robust_combine(aggregation: str, vectors: Sequence[np.ndarray], trim_fraction: float = 0.0,
                   malicious_nodes: int = 0, krum_select: int = 1) -> np.ndarray:
    """The rule over ``vectors`` (one per valid reply, all of one shape; ValueError otherwise): float32."""
    if not len(vectors):
        raise ValueError("no vectors to aggregate")
    shapes = {np.shape(v) for v in vectors}
    if len(shapes) != 1:  # never broadcast a (1,) vector into the rest
        raise ValueError(f"vectors of different shapes: {sorted(shapes)}")
    rule = flower_rule(aggregation, trim_fraction, malicious_nodes, krum_select)
    replies = [Message(RecordDict({"adapter": ArrayRecord({"adapter": Array(np.asarray(v, dtype=np.float64))}),
                                   "metrics": MetricRecord({"num-examples": 1})}), dst_node_id=0, message_type="train")
               for v in vectors]
    arrays, _ = rule.aggregate_train(0, replies)
    return arrays["adapter"].numpy().astype(np.float32)


__all__ = ["flower_rule", "robust_combine"]
