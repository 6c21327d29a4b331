"""The causal-LM variant of the shared task data (TaskData): prompt/answer records, encoded with
answer-only labels, split and partitioned like the classification data."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from fedsb.causal import PromptAnswer, load_chatterbot, load_gsm, load_jsonl_prompt_answer, tokenize_prompt_answer
from fedsb.config import ConfigError, FedSBConfig
from fedsb.data import EncodedDataset, TaskData, split_indices


class CausalDataset(EncodedDataset):
    """Items carry per-token labels (-100 on the prompt); ``labels`` (all 0) only feeds the partitioner."""

    def subset(self, indices) -> "CausalDataset":
        return CausalDataset(self.encodings, self.labels, self.indices[np.asarray(indices)])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = int(self.indices[i])
        return {k: torch.tensor(v[j], dtype=torch.long) for k, v in self.encodings.items()}


def load_records(cfg: FedSBConfig) -> list[PromptAnswer]:
    if cfg.dataset in ("default", "gsm"):
        return load_gsm(cfg.num_examples, cfg.seed)
    if cfg.dataset == "chatterbot":
        return load_chatterbot()
    if not cfg.dataset.endswith((".jsonl", ".json")):
        raise ConfigError("dataset", f"task=causal-lm reads `gsm`, `chatterbot` or a JSONL file with prompt/answer; got {cfg.dataset!r}")
    try:
        return load_jsonl_prompt_answer(cfg.dataset, cfg.text_column if cfg.text_column != "text" else "prompt",
                                        cfg.label_column if cfg.label_column != "sentiment" else "answer")
    except (OSError, ValueError) as e:
        raise ConfigError("dataset", str(e)) from e


@lru_cache(maxsize=2)
def load_causal_task_data(cfg: FedSBConfig, model_path: str) -> TaskData:
    from fedsb.models import load_tokenizer

    if cfg.partitioner == "dirichlet":
        raise ConfigError("partitioner", "`dirichlet` partitions by class label; task=causal-lm has none: use `iid`")
    records = load_records(cfg)
    tok = load_tokenizer(model_path)
    enc = tokenize_prompt_answer(tok, records, cfg.max_length, use_chat_template=True)
    encodings = {k: [e[k] for e in enc] for k in ("input_ids", "attention_mask", "labels")}
    ds = CausalDataset(encodings, np.zeros(len(records), dtype=np.int64))
    train_idx, test_idx = split_indices(len(ds), cfg.test_fraction, cfg.seed)
    data = TaskData(ds, train_idx, test_idx, 0, [], tok.pad_token_id)
    data.records = [records[i] for i in test_idx]
    return data
