"""Aggregation rules over flat update vectors: weighted mean (streaming), coordinate median, trimmed mean."""

from __future__ import annotations

from typing import Sequence

import numpy as np


class RunningWeightedMean:
    """Σ w_i v_i / Σ w_i accumulated one reply at a time: memory independent of the number of clients."""

    def __init__(self):
        self.total: np.ndarray | None = None
        self.total_weight = 0.0
        self.count = 0

    def add(self, vec: np.ndarray, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        v = np.asarray(vec, dtype=np.float64)
        self.total = v * weight if self.total is None else self.total + v * weight
        self.total_weight += float(weight)
        self.count += 1

    def result(self) -> np.ndarray:
        if self.total is None:
            raise ValueError("no vectors were added")
        return (self.total / self.total_weight).astype(np.float32)


def weighted_mean(vectors: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    acc = RunningWeightedMean()
    for v, w in zip(vectors, weights):
        acc.add(v, w)
    return acc.result()


def coordinate_median(vectors: Sequence[np.ndarray]) -> np.ndarray:
    return np.median(np.stack([np.asarray(v, np.float64) for v in vectors]), axis=0).astype(np.float32)


def trimmed_mean(vectors: Sequence[np.ndarray], trim_fraction: float) -> np.ndarray:
    """Per coordinate, drop the floor(k·trim) smallest and largest values and average the rest."""
    stack = np.sort(np.stack([np.asarray(v, np.float64) for v in vectors]), axis=0)
    k = stack.shape[0]
    t = int(np.floor(k * trim_fraction))
    if k - 2 * t <= 0:
        raise ValueError(f"trim-fraction {trim_fraction} leaves no values of {k}")
    return stack[t : k - t].mean(axis=0).astype(np.float32)
