"""A node's own settings: what ``flower-supernode --node-config`` says about this machine and its party.

Everything the run config fixes for the whole federation (method, rank, rounds, the label set) comes from
the server; what belongs to one party (its data file, its copy of the model, its cores, its privacy
bounds) comes from here and is never sent to, or overridden by, the server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from fedsb.config import ConfigError, FedSBConfig


class NodeConfigError(ConfigError):
    """A ``--node-config`` value is invalid; ``key`` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(key, message)
        self.args = (f"node-config '{key}': {message}",)

    def __str__(self) -> str:
        return self.args[0]


# node-config key -> (field, type); Flower's own simulation keys included
_KEYS = {"partition-id": ("partition_id", int), "num-partitions": ("num_partitions", int),
         "dataset": ("dataset", str), "text-column": ("text_column", str), "text-pair-column": ("text_pair_column", str),
         "label-column": ("label_column", str), "model": ("model", str), "num-threads": ("num_threads", int),
         "dp-delta": ("dp_delta", float), "max-epsilon": ("max_epsilon", float), "rank": ("rank", int)}


@dataclass(frozen=True)
class NodeSettings:
    partition_id: int = 0
    num_partitions: int = 1
    dataset: str = ""  # this node's own file: its whole training set (less its held-out slice), no partitioning
    text_column: str = ""  # "" : the run config's column names
    text_pair_column: str = ""
    label_column: str = ""
    model: str = ""  # this node's own copy of the model ("" : the run config's)
    num_threads: int = 0  # 0: see ``threads``
    dp_delta: float = 0.0  # the node's own bound on δ (0: 1/(10·n_local))
    max_epsilon: float = 0.0  # the node's own cap on ε (0: the run's target-epsilon only)
    rank: int | None = None  # nested ranks: this node's own rank

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "NodeSettings":
        """Parse the keys fedsb reads; other keys (a deployment's own) are left alone."""
        values: dict[str, Any] = {}
        for key, (name, typ) in _KEYS.items():
            if key not in node_config:
                continue
            raw = node_config[key]
            try:
                values[name] = typ(raw) if not isinstance(raw, bool) else None
            except (TypeError, ValueError):
                values[name] = None
            if values[name] is None:
                raise NodeConfigError(key, f"got {raw!r}; expected {typ.__name__}")
        s = cls(**values)
        for key, v in (("num-threads", s.num_threads), ("dp-delta", s.dp_delta), ("max-epsilon", s.max_epsilon)):
            if v < 0:
                raise NodeConfigError(key, f"got {v!r}; must be >= 0 (0: the default)")
        if s.dp_delta >= 1:
            raise NodeConfigError("dp-delta", f"got {s.dp_delta!r}; must be < 1 (e.g. 1e-5)")
        if s.dataset and not os.path.isfile(os.path.expanduser(s.dataset)):
            raise NodeConfigError("dataset", f"{s.dataset!r} is not a file on this node; give the path of the "
                                  "node's CSV/TSV/JSONL file as the SuperNode sees it (inside its container)")
        return s

    def task_config(self, cfg: FedSBConfig) -> FedSBConfig:
        """The run config as this node loads its task (data and model): its own file, columns and model
        where it names them."""
        changes = {k: v for k, v in (("dataset", self.dataset), ("text_column", self.text_column),
                                     ("text_pair_column", self.text_pair_column), ("label_column", self.label_column),
                                     ("model", self.model)) if v}
        if cfg.dataset == "none" and not self.dataset:
            raise NodeConfigError("dataset", "the run config says dataset='none' (the server holds no data), so this "
                                  "node trains on its own file; give its path: --node-config \"dataset='/data/local.csv'\"")
        if self.dataset and cfg.task == "seq-cls" and not cfg.labels.strip():
            raise NodeConfigError("dataset", "a node with its own file needs the run config's labels (e.g. "
                                  "labels='negative,neutral,positive'), so every party maps classes to the same "
                                  "head rows; set it in the run config")
        # The node's own file is its whole training set less its held-out slice: nothing is carved out of it
        # for the server's init gradient or a validation slice (those are the server's data, not a party's).
        # This config only loads the node's task; training and DP keep the run's own config.
        if self.dataset:
            changes.update(init_source="clients", init_dataset="", eval_dataset="", validation_fraction=0.0,
                           eval_split="test")
        return cfg.replace(**changes) if changes else cfg

    def threads(self) -> int:
        """Intra-op threads for torch: ``num-threads``; else FEDSB_CLIENT_THREADS; else OMP_NUM_THREADS, which
        Ray sets in each simulated client's actor to its ``client-resources-num-cpus``; else every core this
        process may run on (a deployed SuperNode has the machine, or its container's cpuset, to itself)."""
        if self.num_threads > 0:
            return self.num_threads
        for var in ("FEDSB_CLIENT_THREADS", "OMP_NUM_THREADS"):
            raw = os.environ.get(var, "").strip()
            if raw.isdigit() and int(raw) > 0:
                return int(raw)
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
