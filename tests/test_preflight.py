"""Config errors a run can know of fail before Flower starts, name the key, and leave no directory behind:
through `fedsb simulate`, and through `fedsb check-config`, which `make run` calls before `flwr run`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from server import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_flower(monkeypatch, tmp_path):
    """Starting Flower's simulation fails the test; the cwd is empty, so a default runs/ dir would show."""
    import importlib

    run_simulation = importlib.import_module("flwr.simulation.run_simulation")  # the module, not its function

    def started(*args, **kwargs):
        raise AssertionError("Flower's simulation started: the error was not found before")

    monkeypatch.setattr(run_simulation, "_run_simulation", started)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def _config_text(cfg: dict) -> str:
    return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={str(v).lower()}" for k, v in cfg.items())


@pytest.mark.parametrize("nodes, says", [(1, ["min-available-nodes", "got 2", "only 1 node"]),
                                         (0, ["num-supernodes", "got 0"])])
def test_too_few_simulated_nodes_fail_naming_both(no_flower, capsys, nodes, says):
    assert cli.main(["simulate", "--num-supernodes", str(nodes)]) == 2
    err = capsys.readouterr().err
    assert all(s in err for s in says), err
    assert list(no_flower.iterdir()) == []


def _bad(tiny_bert, sentiment_csv, tmp_path) -> dict[str, tuple[dict, str]]:
    held = tmp_path / "held"  # an output-dir that holds a finished run's metrics
    held.mkdir()
    (held / "metrics.jsonl").write_text("{}\n")
    return {
        "missing dataset": ({"dataset": str(tmp_path / "nope.csv")}, "dataset"),
        "missing column": ({"text-column": "body"}, "text-column"),
        "missing label column": ({"label-column": "sentiment"}, "label-column"),
        "bad model folder": ({"model": str(tmp_path)}, "model"),
        "unmatched target-modules": ({"target-modules": "q_proj"}, "target-modules"),
        "rank above a layer's width": ({"rank": 64}, "rank"),
        "output-dir holds a run": ({"output-dir": str(held)}, "output-dir"),
        "resume without a checkpoint": ({"resume": True, "output-dir": str(tmp_path / "never-ran")}, "resume"),
    }


@pytest.mark.parametrize("case", ["missing dataset", "missing column", "missing label column", "bad model folder",
                                  "unmatched target-modules", "rank above a layer's width", "output-dir holds a run",
                                  "resume without a checkpoint"])
def test_config_errors_fail_before_flower_and_leave_nothing(tiny_bert, sentiment_csv, tmp_path, no_flower, capsys, case):
    override, key = _bad(tiny_bert, sentiment_csv, tmp_path)[case]
    cfg = {"model": str(tiny_bert), "dataset": str(sentiment_csv), "label-column": "label", "rank": 4, **override}
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert cli.main(["simulate", "--num-supernodes", "2", "--run-config", _config_text(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: run-config '{key}'") and "\n" not in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing created anywhere


@pytest.mark.parametrize("text, says", [("rank=0", "error: run-config 'rank'"),
                                        ("lerning-rate=0.1", "error: run-config 'lerning-rate'"),
                                        ("dp='maybe'", "error: run-config 'dp'"),
                                        ("dataset=data.csv", "error: --run-config")])  # unquoted string
def test_check_config_says_one_line_and_fails(capsys, text, says):
    assert cli.main(["check-config", "--run-config", text]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(says) and "\n" not in err, err


def test_check_config_passes_a_good_config(tiny_bert, sentiment_csv, tmp_path, capsys):
    cfg = {"model": str(tiny_bert), "dataset": str(sentiment_csv), "label-column": "label", "rank": 4,
           "output-dir": str(tmp_path / "run")}
    assert cli.main(["check-config", "--num-supernodes", "2", "--run-config", _config_text(cfg)]) == 0
    assert "run config ok" in capsys.readouterr().out and not (tmp_path / "run").exists()


def test_make_run_checks_the_config_before_flwr_run():
    """`flwr run` exits 0 on a bad value: make run must stop at fedsb's check first (make stops at a failed line)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    p = subprocess.run(["make", "--no-print-directory", "-n", "run", "NUM_SUPERNODES=3", "RUN_CONFIG=rank=0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    lines = p.stdout.splitlines()
    check = next(i for i, line in enumerate(lines) if "fedsb check-config" in line)
    flwr = next(i for i, line in enumerate(lines) if "flwr run" in line)
    assert check < flwr and "--num-supernodes 3" in lines[check] and "rank=0" in lines[check], p.stdout
