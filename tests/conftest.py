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


def user_env() -> dict:
    """The environment a user's shell gives a command: the tests' FEDSB_PROGRESS=0 removed (the default)."""
    env = {k: v for k, v in os.environ.items() if k != "FEDSB_PROGRESS"}
    return dict(env, PYTHONPATH=os.pathsep.join([_ROOT, env.get("PYTHONPATH", "")]))


@pytest.fixture(scope="session")
def ray_run(tiny_bert, sentiment_csv, tmp_path_factory) -> tuple[Path, str]:
    """The suite's one Ray simulation, started as a user starts it (``fedsb simulate`` in a process of its
    own): 3 nodes, 3 rounds, federated evaluation. Returns (run directory, the command's whole output).
    tests/test_simulation.py checks the run (and that the in-process grid reproduces it), tests/test_first_run.py
    what the user sees. Nothing may write into its directory: copy it first."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("ray") / "fed-sb"
    cfg = tiny_run_config(tiny_bert, sentiment_csv, out, **{"federated-evaluate": True})
    text = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={str(v).lower()}" for k, v in cfg.items())
    p = subprocess.run([sys.executable, "-m", "server.cli", "simulate", "--num-supernodes", "3", "--run-config", text],
                       cwd=_ROOT, env=user_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return out, p.stdout + p.stderr


@pytest.fixture(autouse=True)
def default_dtype_is_float32():
    """Every test starts with torch's float32 default: a test (or a module, at import) that changes it and
    does not restore it fails the next test here, instead of silently changing what later tests compute."""
    assert torch.get_default_dtype() == torch.float32, "an earlier test or module leaked torch's default dtype"
    yield
