"""The run directory: metrics.jsonl, summary.json, plots (DESIGN.md §4). Written as the run goes."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from fedsb.config import ConfigError, FedSBConfig

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.safetensors"
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
        if records is not None:  # resuming: rewrite exactly the records the checkpoint knew
            with open(self.run_dir / METRICS, "w") as fh:
                for r in self.records:
                    fh.write(json.dumps(r) + "\n")

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
            import matplotlib

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
