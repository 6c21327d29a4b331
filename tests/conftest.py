"""Shared fixtures: the tiny model and synthetic dataset of lab/tiny.py, and the environment every test runs in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FEDSB_PROGRESS", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray workers and the tests' subprocesses inherit the environment: let them import the project and tests.*.
_ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH", "")) if p)

from lab.tiny import make_sentiment_csv, make_tiny_bert, minilm_dir, tiny_run_config  # noqa: E402,F401 (tests import them from here)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> Path:
    return make_sentiment_csv(tmp_path_factory.mktemp("data") / "sentiment.csv")


@pytest.fixture(autouse=True)
def default_dtype_is_float32():
    """Every test starts with torch's float32 default: a test (or a module, at import) that changes it and
    does not restore it fails the next test here, instead of silently changing what later tests compute."""
    assert torch.get_default_dtype() == torch.float32, "an earlier test or module leaked torch's default dtype"
    yield
