"""A sequence-classification ``Task`` from a model object and local examples: no subclass, no file, no path.

What ``FedSBClient.from_functions`` builds on a node from the user's ``model_fn`` and ``data_fn``. The user's
examples are converted once into fedsb's own format (``EncodedDataset``), so batching, DP sampling and
evaluation are the same code as for a CSV.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from fedsb.config import ConfigError, FedSBConfig
from fedsb.tasks.base import validate_targets
from fedsb.tasks.cache import Ragged
from fedsb.tasks.data import EncodedDataset, TaskData
from fedsb.tasks.models import content_id
from fedsb.tasks.seq_cls import SeqClsTask

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")  # what a tokenizer returns; other columns are dropped


def encode_examples(train: Sequence[dict[str, Any]], test: Sequence[dict[str, Any]], label_names: Sequence[str],
                    pad_id: int) -> TaskData:
    """Tokenized examples (dicts with ``input_ids``, optionally ``attention_mask``/``token_type_ids``, and an
    integer ``labels`` or ``label``: a list of dicts, a tokenized ``datasets.Dataset``, a torch Dataset)
    -> one ``TaskData`` whose train/test indices are the two sets."""
    rows = [ds[i] for ds in (train, test) for i in range(len(ds))]
    if not len(train):
        raise ValueError("data_fn returned no training examples for this node")
    keys = [k for k in INPUT_KEYS if k in rows[0]]
    if "input_ids" not in keys:
        raise ValueError(f"data_fn: examples need input_ids (tokenize them); the first one has {sorted(rows[0])}")
    labels = []
    for i, row in enumerate(rows):
        label = row.get("labels", row.get("label"))
        if label is None or not 0 <= int(label) < len(label_names) or any(k not in row for k in keys):
            raise ValueError(f"data_fn: example {i} has label {label!r} and keys {sorted(row)}; every example "
                              f"needs {keys} and an integer label in [0, {len(label_names)}) (labels or label)")
        labels.append(int(label))
    encodings = {k: Ragged.from_lists([np.asarray(row[k]).reshape(-1).tolist() for row in rows]) for k in keys}
    n_train = len(train)
    return TaskData(EncodedDataset(encodings, np.asarray(labels, dtype=np.int64)), np.arange(n_train),
                    np.arange(n_train, len(rows)), len(label_names), list(label_names), pad_id)


@dataclass(eq=False)
class OwnModelTask(SeqClsTask):
    """``SeqClsTask`` over a model object and this node's own examples (``data.train_idx``/``data.test_idx``)."""

    frozen: nn.Module | None = None  # the frozen base, copied for each use as a loaded model is

    def frozen_copy(self) -> nn.Module:
        return copy.deepcopy(self.frozen)

    @classmethod
    def from_model(cls, cfg: FedSBConfig, model: nn.Module, train, test, label_names: Sequence[str],
                   source: str = "model_fn") -> "OwnModelTask":
        """The task for ``model`` (frozen for ``cfg`` by ``models.freeze``, shared by the tasks of one process)
        and the node's examples; ``source`` names the model in errors. Checks what would otherwise fail later,
        or silently: the task, the label set, the head."""
        if cfg.task != SeqClsTask.name:
            raise ConfigError("task", f"a model and examples of your own are supported for task=seq-cls, got "
                              f"{cfg.task!r}; for causal-lm subclass CausalLMTask and pass FedSBClient(task_for=...)")
        label_names = [str(n) for n in label_names]
        if len(label_names) < 2:
            raise ValueError(f"data_fn: label_names {label_names} needs at least 2 classes")
        if cfg.label_list and tuple(label_names) != tuple(cfg.label_list):
            raise ConfigError("labels", f"data_fn's label_names {label_names} are not the run config's labels "
                              f"{list(cfg.label_list)} (the same classes in the same order on every party); fix one")
        config = getattr(model, "config", None)
        if getattr(config, "num_labels", None) != len(label_names):
            raise ValueError(f"{source}'s model has {getattr(config, 'num_labels', None)} output classes "
                              f"for {len(label_names)} label_names; build it with num_labels={len(label_names)}")
        if config.pad_token_id is None:
            raise ValueError(f"{source}'s model has no config.pad_token_id; set it to the tokenizer's "
                              "pad_token_id in model_fn")
        names = validate_targets(cfg, model)
        data = encode_examples(train, test, label_names, int(config.pad_token_id))
        return cls(cfg, source, data, names, content_id(model, names), frozen=model)


__all__ = ["OwnModelTask", "encode_examples"]
