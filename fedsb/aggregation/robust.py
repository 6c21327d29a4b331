"""The weighted mean of flat update vectors (streaming or all at once), and the trim-fraction bound.

The robust rules (``aggregation = "median" | "trimmed-mean" | "krum"``) are Flower's, applied on the server
(``server/robust.py``); ``TRIM_FRACTION_MAX`` and the aggregation keys' checks stay here because the config checks them without Flower.

The mean accumulates in float64 and returns float32 (the wire dtype). Inputs are expected to have passed
:func:`fedsb.aggregation.validation.check_reply` (same shape, finite); shapes are still checked here, with a clear
``ValueError``, because numpy broadcasting would otherwise silently average a ``(1,)`` vector into the rest.
The weighted mean is deterministic: the same vectors in the same order give bit-identical results, streamed
one reply at a time (:class:`BlockWeightedMean`, what a round uses) or all at once (:func:`weighted_mean`,
the same accumulator).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# At least one value per coordinate must remain after trimming both ends (Flower's FedTrimmedAvg: beta < 0.5).
TRIM_FRACTION_MAX = 0.5


def check_aggregation_keys(cfg) -> None:
    """``aggregation`` and ``max-update-norm`` against ``secagg``, and ``malicious-nodes`` and ``krum-select`` against ``aggregation`` and
    the round's size (a FedSBConfig; here
    because the config checks it without Flower). Krum tolerates f attackers among n replies only if n > 2f + 2
    (Blanchard et al. 2017), and Multi-Krum averages at most the n − f replies that may be honest; a round holds
    at least ``min-train-nodes`` valid replies, so that is the n checked."""
    from fedsb.config_text import ConfigError

    if cfg.secagg and cfg.aggregation != "mean":
        raise ConfigError("aggregation", f"got {cfg.aggregation!r}; with secagg=true only `mean` is possible")
    if cfg.secagg and cfg.max_update_norm > 0:
        raise ConfigError("max-update-norm", "cannot be checked with secagg=true (the server sees no single update); set 0")
    if cfg.aggregation != "krum":
        for key, value, default in (("malicious-nodes", cfg.malicious_nodes, 0), ("krum-select", cfg.krum_select, 1)):
            if value != default:
                raise ConfigError(key, f"got {value}, which only aggregation='krum' uses (aggregation={cfg.aggregation!r});"
                                  f" set aggregation='krum' or leave {key}={default}")
        return
    f, n = cfg.malicious_nodes, cfg.min_train_nodes
    if n < 2 * f + 3:
        raise ConfigError("min-train-nodes", f"got {n}; Krum with malicious-nodes={f} needs at least 2*{f}+3 = {2 * f + 3} "
                          "replies a round; raise min-train-nodes (and the sample, fraction-train) or lower malicious-nodes")
    if cfg.krum_select > n - f:
        raise ConfigError("krum-select", f"got {cfg.krum_select}; at most min-train-nodes - malicious-nodes = {n - f} "
                          "replies can be averaged; lower it")


class BlockWeightedMean:
    """Per entry, ``Σ wᵢ vᵢ / Σ wᵢ`` over the clients that sent that entry; entries nobody sent keep ``base``.

    Accumulated one reply at a time, so memory does not grow with the number of clients. ``add(vec, weight,
    index)`` folds in a client that trained only the entries ``index`` of the global vector (``None``: all
    of them; weight finite and > 0); ``result()`` is float32; ``count`` the replies added.
    """

    def __init__(self, base: np.ndarray) -> None:
        self.base = np.asarray(base, dtype=np.float32)
        self.total = np.zeros(self.base.shape, dtype=np.float64)
        self.weight = np.zeros(self.base.shape, dtype=np.float64)
        self.count = 0

    def add(self, vec: np.ndarray, weight: float, index: np.ndarray | None = None) -> None:
        w = float(weight)
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"weight must be a finite positive number, got {weight!r}")
        sel = slice(None) if index is None else index
        v = np.asarray(vec).astype(np.float64, copy=False) * w
        if v.shape != self.weight[sel].shape:
            raise ValueError(f"vector of shape {v.shape} added to a block of shape {self.weight[sel].shape}")
        fresh = self.weight[sel] == 0  # first contribution: assigned, not added to 0 (keeps the sign of -0.0)
        self.total[sel] = np.where(fresh, v, self.total[sel] + v)
        self.weight[sel] += w
        self.count += 1

    def result(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("no vectors were added")
        out = self.base.copy()
        seen = self.weight > 0
        out[seen] = (self.total[seen] / self.weight[seen]).astype(np.float32)
        return out


def weighted_mean(vectors: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``Σ wᵢ vᵢ / Σ wᵢ`` (float64 accumulation, float32 result): :class:`BlockWeightedMean` over whole
    vectors, so bit-identical to streaming the same vectors in the same order."""
    if len(vectors) != len(weights):
        raise ValueError(f"{len(vectors)} vectors but {len(weights)} weights")
    if not len(vectors):
        raise ValueError("no vectors were added")
    acc = BlockWeightedMean(np.zeros(np.shape(vectors[0]), np.float32))
    for v, w in zip(vectors, weights):
        acc.add(v, w)
    return acc.result()


def weighted_scalar_mean(pairs: Sequence[tuple[float, float]]) -> float | None:
    """``Σ wᵢ xᵢ / Σ wᵢ`` over ``(x, w)`` pairs (a metric weighted by example counts), None when there are none.
    fsum is exactly rounded, so the result does not depend on the order the pairs (replies) arrived in."""
    pairs = list(pairs)
    return math.fsum(x * w for x, w in pairs) / math.fsum(w for _, w in pairs) if pairs else None
