"""``fedsb compare``: the same federation (partitions, seeds, rounds) run once per method, side by side.

Writes ``compare.csv``, ``compare.md``, ``pareto.png`` (accuracy vs total bytes, log x) and
``curves.png`` (held-out accuracy by round) into ``--out``.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("fedsb.compare")

COLUMNS = ["method", "rank", "final_accuracy", "final_loss", "bytes_up_total", "bytes_down_total", "bytes_one_time",
           "bytes_up_per_client_round", "trainable_params", "communicated_params", "seconds"]


def parse_ranks(text: str) -> dict[str, int]:
    """``fed-sb=64,fedit=8`` → {"fed-sb": 64, "fedit": 8}."""
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, _, value = part.partition("=")
        if not value:
            raise ValueError(f"--rank: {part!r} is not METHOD=RANK")
        out[name.strip()] = int(value)
    return out


def compare(methods: list[str], num_supernodes: int, out: Path, overrides: dict[str, Any],
            ranks: dict[str, int] | None = None) -> list[dict]:
    from fedsb.config import METHODS
    from server.simulation import simulate

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; accepted: {', '.join(METHODS)}")
    ranks = ranks or {}
    out.mkdir(parents=True, exist_ok=True)
    for i, method in enumerate(methods, 1):
        cfg = dict(overrides, method=method, **{"output-dir": str((out / method).resolve())})
        if method in ranks:
            cfg["rank"] = ranks[method]
        log.info("=== compare: method %s (%d/%d), rank %s ===", method, i, len(methods), cfg.get("rank", "default"))
        simulate(cfg, num_supernodes)
    return summarize(out, methods)


def summarize(out: Path, methods: list[str]) -> list[dict]:
    """Rows, curves and plots from the run directories ``out/<method>`` (re-runnable without training)."""
    rows, curves = [], {}
    for method in methods:
        run_dir = out / method
        s = json.loads((run_dir / "summary.json").read_text())
        one_time = s["bytes_basis_total"] + s["bytes_init_total"]
        rows.append({
            "method": method, "rank": s["config"]["rank"], "final_accuracy": s["final_accuracy"],
            "final_loss": s["final_loss"],
            # per-round traffic only; the one-time basis broadcast and init gradients are their own column
            "bytes_up_total": s["bytes_up_total"] - s["bytes_init_total"],
            "bytes_down_total": s["bytes_down_total"] - s["bytes_basis_total"],
            "bytes_one_time": one_time,
            "bytes_up_per_client_round": s["bytes_up_per_client_round"], "trainable_params": s["trainable_params"],
            "communicated_params": s["communicated_params"], "seconds": s["seconds"],
        })
        records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curves[f"{method} r={s['config']['rank']}"] = [(r["round"], r["accuracy"]) for r in records if r["phase"] == "evaluate"]
    write_outputs(out, rows, curves)
    return rows


def write_outputs(out: Path, rows: list[dict], curves: dict[str, list]) -> None:
    with open(out / "compare.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (title, key) in zip(axes, (("total bytes (rounds + one-time), log scale", "total"),
                                      ("per-round bytes only (up + down), log scale", "rounds"))):
        for r in rows:
            x = r["bytes_up_total"] + r["bytes_down_total"] + (r["bytes_one_time"] if key == "total" else 0)
            ax.scatter(x, r["final_accuracy"] or 0, s=40)
            ax.annotate(f"{r['method']} r={r['rank']}", (x, r["final_accuracy"] or 0), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy")
    fig.suptitle("accuracy vs communication")
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if v < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)
