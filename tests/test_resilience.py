"""Hostile replies never count; a SIGKILLed run resumes bit for bit; checkpoints are refused when wrong."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import tiny_run_config

ROOT = Path(__file__).resolve().parents[1]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_hostile_replies_are_rejected_and_change_nothing(tiny_bert, sentiment_csv, tmp_path):
    from tests.hostile_app import KINDS, failing, hostile
    from lab.inprocess_grid import run_inprocess

    common = dict(fraction_train=1.0)
    cfg = lambda out: tiny_run_config(tiny_bert, sentiment_csv, out, **{"max-update-norm": 100.0, "max-num-examples": 10**6, "fraction-train": 1.0,
                                                                       "min-available-nodes": 6})
    bad = run_inprocess(cfg(tmp_path / "hostile"), 6, client_app=hostile)
    ref = run_inprocess(cfg(tmp_path / "honest"), 6, client_app=failing)
    # the aggregate equals the honest-only aggregate, bit for bit
    name = "adapter/fedsb_adapter.safetensors"
    assert (bad / name).read_bytes() == (ref / name).read_bytes()
    reasons = [r["reason"] for rec in _records(bad) if rec["phase"] == "train" for r in rec["rejected"]]
    expected = {"non-finite", "shape", "extra-key", "missing-key", "dtype", "fingerprint", "num-examples", "update-norm"}
    assert expected <= set(reasons), reasons
    assert len(reasons) == 4 * 3  # 4 hostile nodes x 3 rounds, every one rejected
    assert all(rec["replies"] == 2 for rec in _records(bad) if rec["phase"] == "train")
    assert all(rec["failed"] == 4 for rec in _records(ref) if rec["phase"] == "train")


SIM_SCRIPT = """
import importlib, json, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import fedsb.run.state
from lab.inprocess_grid import run_inprocess

cfg, hold_after = json.loads(sys.argv[1]), int(sys.argv[2])
module, _, attr = sys.argv[3].partition(":")
server_app = getattr(importlib.import_module(module), attr) if module else None
save = fedsb.run.state.save_checkpoint

def save_then_hold(path, tensors, state):
    # Deterministic crash point: once round `hold_after` is on disk, say so and stop making progress,
    # so the test's SIGKILL lands mid-run however fast the machine is (polling a log raced a fast run).
    save(path, tensors, state)
    if state["round"] == hold_after:
        (Path(path).parent / "held").write_text(str(hold_after))
        while True:
            time.sleep(60)

fedsb.run.state.save_checkpoint = save_then_hold
run_inprocess(cfg, 3, server_app=server_app)
"""


def _run_sim(cfg: dict, hold_after: int, server_app: str = "") -> subprocess.Popen:
    """The run (in-process grid) in its own process group, halted once round ``hold_after`` is checkpointed;
    ``server_app``: "module:attr" of another ServerApp than fedsb's."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", SIM_SCRIPT.format(root=str(ROOT)), json.dumps(cfg), str(hold_after),
                             server_app], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

def kill_once_held(proc: subprocess.Popen, crash_dir, rnd: int, timeout: float) -> None:
    """SIGKILL ``_run_sim``'s process group once the run held after round ``rnd`` (its ``held`` file)."""
    try:
        deadline = time.time() + timeout
        while not (crash_dir / "held").exists():
            if proc.poll() is not None:
                pytest.fail(f"the run exited ({proc.returncode}) before round {rnd} was checkpointed")
            if time.time() > deadline:
                pytest.fail(f"round {rnd} never completed")
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


# fedsb's own ServerApp, and FedSB wrapped in ServerAdam (tests/wrapped_app.py, for an output dir ending in
# "adam"): its moments are in the checkpoint, so round 3 after the resume takes the same step as without a crash;
# and round 2, not evaluated (eval-every=3), is checkpointed with ServerAdam's step, not FedSB's plain mean
@pytest.mark.parametrize("server_app, suffix, extra", [("", "", {}), ("tests.wrapped_app:app", "-adam", {"eval-every": 3})],
                         ids=["fedsb", "server-adam"])
def test_sigkill_and_resume_is_bit_identical(tiny_bert, sentiment_csv, tmp_path, server_app, suffix, extra):
    import importlib

    from safetensors.torch import load_file

    from lab.inprocess_grid import run_inprocess

    module, _, attr = server_app.partition(":")
    app = getattr(importlib.import_module(module), attr) if module else None
    rounds = {"num-server-rounds": 4, **extra}
    run_inprocess(tiny_run_config(tiny_bert, sentiment_csv, tmp_path / f"full{suffix}", **rounds), 3, server_app=app)
    crash_dir = tmp_path / f"crash{suffix}"
    crash = tiny_run_config(tiny_bert, sentiment_csv, crash_dir, **rounds)
    proc = _run_sim(crash, hold_after=2, server_app=server_app)
    kill_once_held(proc, crash_dir, 2, 300)  # round 2 is checkpointed; rounds 3-4 are still to come
    assert proc.returncode == -signal.SIGKILL
    assert not (crash_dir / "summary.json").exists()
    run_inprocess(dict(crash, resume=True), 3, server_app=app)  # only the killed run needs a process of its own
    name = "adapter/fedsb_adapter.safetensors"
    assert (crash_dir / name).read_bytes() == (tmp_path / f"full{suffix}" / name).read_bytes()
    moments = [k for k in load_file(str(crash_dir / "checkpoint.safetensors")) if k.startswith("wrapper.0.")]
    assert bool(moments) == bool(server_app)  # ServerAdam's run checkpointed its moments (and took its steps)
    rounds_logged = [(r["round"], r["phase"]) for r in _records(crash_dir)]
    assert rounds_logged.count((3, "train")) == 1 and rounds_logged.count((4, "evaluate")) == 1


def test_mismatched_or_corrupt_checkpoint_is_refused(tiny_bert, sentiment_csv, tmp_path):
    from fedsb.run.checkpoint import CheckpointError, CheckpointMismatch, check_compatible, load_checkpoint, save_checkpoint
    import torch

    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, {"global": torch.arange(5.0)}, {"round": 1, "config": {"rank": 4, "method": "fed-sb"}})
    _, state = load_checkpoint(path)
    with pytest.raises(CheckpointMismatch) as e:
        check_compatible(state["config"], {"method": "fed-sb", "rank": 8})
    assert e.value.field == "rank" and "rank" in str(e.value)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert path.read_bytes() == bytes(raw)  # refused, not overwritten
