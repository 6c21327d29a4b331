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
from fedsb.tasks.causal import (PromptAnswer, causal_per_example_loss, exact_match, generate_answers, load_chatterbot,
                                load_gsm, load_jsonl_prompt_answer, load_smollm2, tokenize_prompt_answer)
from fedsb.tasks.reasoning import DEFAULT_TASK, ReasoningRecord, build_records, evaluate_generations, spec_for
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
    if cfg.dataset == "default" or cfg.dataset.startswith("reasoning:"):
        name = DEFAULT_TASK if cfg.dataset == "default" else cfg.dataset.split(":", 1)[1]
        try:
            return build_records(name, cfg.num_examples or spec_for(name).num_examples, cfg.seed)
        except ValueError as e:
            raise ConfigError("dataset", f"{e} (give `reasoning:NAME` with a reasoning-gym generator, e.g. "
                              f"`reasoning:{DEFAULT_TASK}`)") from e
    if cfg.dataset == "gsm":
        return load_gsm(cfg.num_examples or 2000, cfg.seed)
    if cfg.dataset == "chatterbot":
        return load_chatterbot()
    if not cfg.dataset.endswith((".jsonl", ".json")):
        raise ConfigError("dataset", "task=causal-lm reads `default` (reasoning-gym digit_sum), `reasoning:NAME`, `gsm`, "
                          f"`chatterbot` or a JSONL file with prompt/answer; got {cfg.dataset!r}")
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

    def generation_records(self) -> list[PromptAnswer]:
        """The held-out problems the server generates for (those with a final answer), in a fixed order."""
        return [r for r in (self.data.records or []) if r.final][: self.cfg.eval_generate_samples]

    @property
    def max_new_tokens(self) -> int:
        """max-new-tokens, or (0) the dataset's own: a reasoning generator's answer length, 96 for gsm."""
        if self.cfg.max_new_tokens:
            return self.cfg.max_new_tokens
        recs = self.data.records or []
        return spec_for(recs[0].task).max_new_tokens if recs and isinstance(recs[0], ReasoningRecord) else 96

    def generate(self, model: nn.Module, records: list[PromptAnswer]) -> list[str]:
        """Greedy replies to the records' prompts (batches of 16, left padding), as the server scores them."""
        return generate_answers(model, self.tokenizer, [r.prompt for r in records], self.max_new_tokens, 16,
                                use_chat_template=True)

    def score(self, records: list[PromptAnswer], replies: list[str]) -> float:
        """Exact match with the task's own scorer: a reasoning generator's ``score_answer`` (== 1), else the
        final number of the reply against the record's."""
        if not records:
            return float("nan")
        if isinstance(records[0], ReasoningRecord):
            return evaluate_generations(records, replies)["exact_match"]
        return sum(exact_match(p, r.final or r.answer) for p, r in zip(replies, records)) / len(records)

    def server_evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        m = self.evaluate(model, loader)
        recs = self.generation_records()
        if recs:
            m["exact_match"] = self.score(recs, self.generate(model, recs))
        return m

    def summary(self) -> dict[str, Any]:
        return {}
