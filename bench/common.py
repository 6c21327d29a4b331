"""Helpers shared by the benchmarks: interleaved repeated timing, medians, the machine's description."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "torch": torch.__version__, "python": platform.python_version()}


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, dict]:
    """Time each function ``repeats`` times, interleaving them (A B C A B C ...) so that machine noise
    hits all of them alike; report the median and the spread. Ratios of medians are the result."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "n": len(v)} for k, v in times.items()}


def merge_rows(path, new: dict, key: Callable[[dict], object]) -> dict:
    """Merge freshly measured rows into an existing results file measured under the same settings, so a
    long comparison can be finished in parts. Rows whose key is measured again are replaced; a file
    measured with other settings is refused rather than mixed (its numbers would not be comparable)."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        return new
    old = json.loads(path.read_text())
    for field in ("run_config", "num_supernodes"):
        if old.get(field) != new.get(field):
            raise SystemExit(f"--merge: {path} was measured with {field}={old.get(field)!r}, this run uses "
                             f"{new.get(field)!r}; run with the same settings, or without --merge to replace it")
    fresh = {key(r) for r in new["rows"]}
    merged = dict(new, rows=[r for r in old["rows"] if key(r) not in fresh] + new["rows"])
    merged.pop("partial", None)
    return merged
