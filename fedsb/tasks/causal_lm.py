"""Causal LM: prompt/answer records, answer-only loss, perplexity and (on the server) generated exact match."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsb.config import ConfigError, FedSBConfig
from fedsb.tasks.base import Task
from fedsb.tasks.causal import (PromptAnswer, causal_per_example_loss, evaluate_exact_match, load_chatterbot, load_gsm,
                                load_jsonl_prompt_answer, load_smollm2, tokenize_prompt_answer)
from fedsb.tasks.data import EncodedDataset, TaskData, split_rest
from fedsb.tasks.models import load_tokenizer


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
    if cfg.partitioner == "dirichlet":
        raise ConfigError("partitioner", "`dirichlet` partitions by class label; task=causal-lm has none: use `iid`")
    records = load_records(cfg)
    tok = load_tokenizer(model_path)
    enc = tokenize_prompt_answer(tok, records, cfg.max_length, use_chat_template=True)
    encodings = {k: [e[k] for e in enc] for k in ("input_ids", "attention_mask", "labels")}
    ds = CausalDataset(encodings, np.zeros(len(records), dtype=np.int64))
    carve = cfg.init_server_samples if cfg.init_source == "server" else 0
    if cfg.init_dataset:
        raise ConfigError("init-dataset", "task=causal-lm takes the server's slice from dataset; leave init-dataset empty")
    server_idx, train_idx, val_idx, test_idx = split_rest(len(ds), carve, cfg.test_fraction, cfg.seed,
                                                          cfg.validation_fraction)
    data = TaskData(ds, train_idx, test_idx, 0, [], tok.pad_token_id, server_idx=server_idx, val_idx=val_idx,
                    eval_split=cfg.eval_split)
    data.records = [records[i] for i in data.eval_idx]
    return data


class CausalLMTask(Task):
    name = "causal-lm"
    peft_task_type = "CAUSAL_LM"

    @classmethod
    def default_model(cls) -> str:
        return load_smollm2()

    @classmethod
    def load_data(cls, cfg: FedSBConfig, model_path: str) -> TaskData:
        return load_causal_task_data(cfg, model_path)

    per_example_loss = staticmethod(causal_per_example_loss)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        model.eval()
        loss_sum, n = 0.0, 0
        for batch in loader:
            losses = causal_per_example_loss(model, batch)
            loss_sum += float(losses.sum())
            n += int(losses.shape[0])
        if n == 0:
            return {"loss": float("nan"), "num-examples": 0}
        loss = loss_sum / n
        return {"loss": loss, "num-examples": n, "perplexity": math.exp(min(loss, 50.0))}

    def server_evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        m = self.evaluate(model, loader)
        # generation-based exact match on a bounded number of held-out problems (those with a final answer)
        recs = [r for r in (self.data.records or []) if r.final][: self.cfg.eval_generate_samples]
        if recs:
            m["exact_match"] = evaluate_exact_match(model, self.tokenizer, recs, self.cfg.max_new_tokens, 16,
                                                    use_chat_template=True)
        return m

    def summary(self) -> dict[str, Any]:
        return {}
