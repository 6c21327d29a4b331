"""Helpers shared by the BENCHMARKS.md renderers (``bench.report``, ``bench.report_variants``)."""

from __future__ import annotations

import json
from pathlib import Path

R = Path("bench/results")


def _load(name):
    p = R / name
    return json.loads(p.read_text()) if p.exists() else None


def _b(n) -> str:
    return "—" if n is None else f"{n:,.0f}"


def _f(x, d=3) -> str:
    return "—" if x is None else f"{x:.{d}f}"


def _command(bench: str, data: dict) -> str:
    """The command line that produced ``data`` (a bench result that records its supernodes and run config)."""
    rc = " ".join(f"{k}={v}" for k, v in data["run_config"].items())
    return f"Command: `python -m bench.{bench} --num-supernodes {data['num_supernodes']} --run-config \"{rc}\"`"


def _missing(cmd: str) -> list[str]:
    return [f"*Not measured yet: run `{cmd}`.*", ""]
