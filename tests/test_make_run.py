"""README's first command as a user runs it: `make run` (a real `flwr run` against the local SuperLink it
starts) completes, prints no deprecation warning, and leaves no SuperLink of its own running."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lab.flwr_cli import free_port
from server import local_superlink

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.deployment
def test_make_run_completes_and_stops_the_superlink_it_started(tiny_bert, sentiment_csv, tmp_path, monkeypatch):
    home, run_dir = tmp_path / "flwr-home", tmp_path / "run"
    env = dict(os.environ, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
               FLWR_LOCAL_CONTROL_API_PORT=str(free_port()))
    run_config = (f"model='{tiny_bert}' dataset='{sentiment_csv}' text-column='text' label-column='label' "
                  "max-length=16 rank=4 init-samples=16 num-server-rounds=1 local-steps=2 eval-max-samples=50 "
                  "fraction-train=1.0")
    out = subprocess.run(["make", "run", f"FLWR_HOME={home}", "NUM_SUPERNODES=2", f"RUN_DIR={run_dir}",
                          f"RUN_CONFIG={run_config}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "run complete" in log and (run_dir / "summary.json").is_file()
    assert "deprecated" not in log.lower(), log[-4000:]
    monkeypatch.setenv("FLWR_HOME", str(home))
    assert local_superlink.local_superlinks() == []  # make run stopped the SuperLink flwr run started


def test_make_targets_run_what_they_say():
    """make test runs the suite without the docker marker; docker-test and run-llm are their own targets, and no
    recipe overrides another (an edit once made make test build Docker images)."""
    def dry(target):
        # (under `make test` this runs inside make: MAKEFLAGS and MAKELEVEL would add "Entering directory" lines)
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
        p = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=ROOT, capture_output=True, text=True,
                           timeout=60, env=env)
        assert p.returncode == 0 and "overriding recipe" not in p.stderr, p.stderr
        return [line for line in p.stdout.strip().splitlines() if not line.startswith("make")]

    assert "pytest -q" in dry("test")[-1] and "-m docker" not in dry("test")[-1]
    assert "-m docker" in dry("docker-test")[-1]
    sim, check = dry("run-llm")[-2:]
    assert "fedsb simulate --num-supernodes 4" in sim and "task='causal-lm'" in sim and "fedsb check-run" in check
