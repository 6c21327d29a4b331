"""The run directory: metrics.jsonl (one JSON record per round and phase, appended and fsynced as the run
goes; the run's only copy of its history), summary.json at the end, and a plot of the held-out curves."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import socket
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from fedsb.config import ConfigError, FedSBConfig
from fedsb.extras import require

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.safetensors"
LOCK = "run.lock"
LOCK_WAIT_SECONDS = 60.0  # how long a new writer waits for the one before it to end (it ends within seconds)
PACKAGES = ("fedsb", "flwr", "torch", "transformers", "opacus", "peft", "safetensors", "numpy")


def check_run_dir(cfg: FedSBConfig) -> Path:
    """The run directory's path; refuse one that holds an earlier run's results (unless resuming), or a
    resume without a checkpoint. Creates nothing (the pre-flight check calls it)."""
    path = Path(cfg.output_dir or f"runs/{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}").expanduser().resolve()
    if (path / METRICS).exists() and not cfg.resume:
        raise ConfigError(
            "output-dir",
            f"{path} already holds a run (metrics.jsonl); choose another output-dir, or set resume=true "
            "to continue it. Nothing was overwritten.",
        )
    if cfg.resume and not (path / CHECKPOINT).exists():
        raise ConfigError("resume", f"resume=true but {path} has no {CHECKPOINT}; drop resume or fix output-dir")
    return path


def prepare_run_dir(cfg: FedSBConfig) -> Path:
    """Create the run directory, after ``check_run_dir``'s checks."""
    path = check_run_dir(cfg)
    path.mkdir(parents=True, exist_ok=True)
    return path


def lock_run_dir(path: Path, wait: float | None = None):
    """Hold ``path/run.lock`` while this process writes the run directory; returns the open lock file
    (closing it releases the lock) or None where the platform has no ``flock``.

    Why: one run directory must have one writer. After a SuperLink restart the run's ServerApp may still be
    alive (its executor kept running and reconnected: the run goes on by itself), and a run submitted again
    with ``resume=true`` would then write the same rounds a second time. The lock is an advisory ``flock``
    that the kernel drops when its process ends, SIGKILL included, so a dead writer never leaves it held.
    Hand-written on the standard library's ``fcntl`` because the file also names its holder (pid, host,
    since when) for the refusal, written only once the lock is ours.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; keeping to one writer is the user's affair there
        log.warning("no file locking on this platform: nothing stops a second ServerApp writing %s", path)
        return None
    fh = open(path / LOCK, "a+")
    deadline = time.monotonic() + (LOCK_WAIT_SECONDS if wait is None else wait)
    waited = False
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                fh.seek(0)
                holder = fh.read().strip() or "a process that did not say who it is"
                fh.close()
                raise ConfigError(
                    "output-dir",
                    f"{path} is being written by another ServerApp ({holder}). After a SuperLink restart the run's "
                    "ServerApp goes on by itself when its executor kept running (`flwr ls` lists the run as "
                    "running): let it finish, or stop it (`flwr stop RUN_ID`) and then submit again with "
                    "resume=true; or choose another output-dir.") from None
            if not waited:
                log.info("waiting up to %.0f s for the ServerApp that holds %s to end", deadline - time.monotonic(),
                         path / LOCK)
                waited = True
            time.sleep(0.5)
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    fh.flush()
    return fh


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


class RunRecorder:
    """Appends one JSON object per round and phase; every line is flushed and fsynced."""

    def __init__(self, run_dir: Path, method: str, records: list[dict] | None = None):
        self.run_dir = Path(run_dir)
        self.method = method
        self.records: list[dict] = list(records or [])

    @classmethod
    def resume(cls, run_dir: Path, method: str, last_round: int) -> "RunRecorder":
        """The recorder of a run resumed from its checkpoint of ``last_round``: the history read back from
        metrics.jsonl, without the records of later rounds (written after that checkpoint by the run that
        stopped, and about to be written again) or a line cut short by a crash; the file is rewritten
        (atomically) to match, so no round is recorded twice."""
        path = Path(run_dir) / METRICS
        records = []
        lines = path.read_text().splitlines() if path.exists() else []
        for i, line in enumerate(lines):
            try:
                rec = json.loads(line)
            except ValueError:
                if i == len(lines) - 1:  # the last line, cut short by a crash mid-write
                    break
                raise ValueError(f"{path}: line {i + 1} is not JSON, so the run's history cannot be read back to "
                                 "resume; repair or delete that line, or start afresh in another output-dir") from None
            if rec["round"] <= last_round:
                records.append(rec)
        tmp = path.with_name(METRICS + ".tmp")
        with open(tmp, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return cls(run_dir, method, records)

    def log(self, round_: int, phase: str, **fields: Any) -> dict:
        base = {k: None for k in ("loss", "accuracy", "bytes_up", "bytes_down", "clients", "seconds", "epsilon")}
        rec = _clean({"round": round_, "phase": phase, "method": self.method, **base, **fields})
        self.records.append(rec)
        with open(self.run_dir / METRICS, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return rec

    def last(self, phase: str) -> dict | None:
        return next((r for r in reversed(self.records) if r["phase"] == phase), None)

    def write_summary(self, summary: dict) -> None:
        tmp = self.run_dir / (SUMMARY + ".tmp")
        tmp.write_text(json.dumps(_clean(summary), indent=2, sort_keys=True))
        os.replace(tmp, self.run_dir / SUMMARY)

    def plot(self) -> Path | None:
        """accuracy/loss by round (plots are a convenience: a failure here never fails a run)."""
        try:
            matplotlib = require("matplotlib", "the run's curves.png", "plots")
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            ev = [r for r in self.records if r["phase"] == "evaluate"]
            if not ev:
                return None
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
            rounds = [r["round"] for r in ev]
            for ax, key in zip(axes, ("accuracy", "loss")):
                vals = [r.get(key) for r in ev]
                if any(v is not None for v in vals):
                    ax.plot(rounds, vals, marker="o")
                ax.set_xlabel("round")
                ax.set_ylabel(f"held-out {key}")
                ax.grid(alpha=0.3)
            fig.suptitle(f"{self.method}: centralized evaluation")
            fig.tight_layout()
            out = self.run_dir / "curves.png"
            fig.savefig(out, dpi=100)
            plt.close(fig)
            return out
        except Exception as e:  # noqa: BLE001
            log.warning("could not plot: %s", e)
            return None
