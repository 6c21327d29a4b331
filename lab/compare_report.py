"""What ``fedsb compare`` writes, from its run directories alone (re-runnable without training).

``compare.csv``: one row per run (method, rank, lr, seed, split). ``compare.md``: one row per (method,
rank) of the held-out runs with the accuracy mean and standard deviation over seeds, the chosen rate and
the bytes; then the verdict per communication budget; then the learning-rate selection. ``pareto.png``:
accuracy mean ± std against bytes, one line per method over its ranks. ``curves.png``: mean held-out
accuracy by round.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any, Callable

from fedsb.extras import MissingExtra, require

log = logging.getLogger("fedsb.compare")

COLUMNS = ["method", "rank", "lr", "seed", "split", "final_accuracy", "final_loss", "bytes_up_total", "bytes_down_total",
           "bytes_one_time", "bytes_total", "bytes_up_per_client_round", "trainable_params", "communicated_params",
           "rounds", "seconds", "epsilon", "majority_rate", "run_dir"]
GROUP_COLUMNS = ["method", "rank", "lr", "lr_at_edge", "seeds", "accuracy_mean", "accuracy_std", "bytes_up_per_client_round",
                 "bytes_one_time", "bytes_rounds", "bytes_total"]


def run_row(run_dir: Path) -> dict[str, Any]:
    s = json.loads((run_dir / "summary.json").read_text())
    c = s["config"]
    one_time = s["bytes_basis_total"] + s["bytes_init_total"]
    up, down = s["bytes_up_total"] - s["bytes_init_total"], s["bytes_down_total"] - s["bytes_basis_total"]
    return {"method": c["method"], "rank": c["rank"], "lr": c["learning-rate"], "seed": c["seed"], "split": c.get("eval-split", "test"),
            "final_accuracy": s["final_accuracy"], "final_loss": s["final_loss"],
            # per-round traffic; the one-time basis broadcast and init uploads are their own column
            "bytes_up_total": up, "bytes_down_total": down, "bytes_one_time": one_time, "bytes_total": up + down + one_time,
            "bytes_up_per_client_round": s["bytes_up_per_client_round"], "trainable_params": s["trainable_params"],
            "communicated_params": s["communicated_params"], "rounds": s["rounds"], "seconds": s["seconds"],
            # user-level DP's ε when a wrapper reported one (bench/compose.py's user_dp); empty otherwise
            "epsilon": (s.get("central_dp") or {}).get("epsilon", ""),
            # the evaluated split's majority-class share: the accuracy of a model that learned nothing
            "majority_rate": s.get("majority_rate", ""), "run_dir": str(run_dir)}


_TYPES = {"rank": int, "seed": int, "lr": float, "final_accuracy": float, "final_loss": float, "rounds": int,
          "seconds": float, "bytes_up_per_client_round": float}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The per-run rows of a ``compare.csv`` as ``run_row`` gives them (for merging runs whose directories
    are gone: the csv is what a finished comparison keeps)."""
    with open(path, newline="") as fh:
        return [{k: (_TYPES.get(k, int)(v) if k in _TYPES or k.startswith(("bytes_", "trainable", "communicated"))
                     else v) for k, v in r.items()} for r in csv.DictReader(fh)]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def group_rows(rows: list[dict]) -> list[dict]:
    """One row per (method, rank) of the held-out runs, in the order the rows first name them."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["split"] == "test":
            groups.setdefault((r["method"], r["rank"]), []).append(r)
    out = []
    for (method, rank), rs in groups.items():
        accs = [r["final_accuracy"] for r in rs if isinstance(r["final_accuracy"], (int, float))]
        mean, std = mean_std(accs) if accs else (math.nan, math.nan)
        sel = sorted({r["lr"] for r in rows if r["split"] == "validation" and (r["method"], r["rank"]) == (method, rank)})
        lr = rs[0]["lr"]
        out.append({"method": method, "rank": rank, "lr": lr, "lr_at_edge": bool(sel) and lr in (sel[0], sel[-1]),
                    "seeds": len(rs), "accuracy_mean": mean, "accuracy_std": std,
                    # byte counts: means over seeds, rounded to whole bytes
                    "bytes_up_per_client_round": round(statistics.fmean(r["bytes_up_per_client_round"] for r in rs)),
                    "bytes_one_time": round(statistics.fmean(r["bytes_one_time"] for r in rs)),
                    "bytes_rounds": round(statistics.fmean(r["bytes_up_total"] + r["bytes_down_total"] for r in rs)),
                    "bytes_total": round(statistics.fmean(r["bytes_total"] for r in rs))})
    return out


def budget_leaders(groups: list[dict], key: str = "bytes_total", family: Callable[[str], str] | None = None) -> list[dict]:
    """Per communication budget (each group's ``key`` bytes: the total, or the per-round traffic alone as a
    long deployment amortizes the one-time cost): the leader and the runner-up among each method's best
    (method, rank) within it, the margin ``d``, its standard error ``se`` (None with fewer than 2 seeds a side)
    and whether the leader ``wins`` (d > 2 SE). ``runner_up`` is None where one method fits. ``family`` names
    the method a row's label belongs to (variants of one method, e.g. its bases or upload dtypes, compete as
    one: the best of them within the budget)."""
    out = []
    for budget in sorted({g[key] for g in groups}):
        ranked = sorted(family_best(groups, family, key, budget).values(), key=lambda g: -g["accuracy_mean"])
        a, b = ranked[0], (ranked[1] if len(ranked) > 1 else None)
        d, se = group_difference(a, b) if b is not None else (None, None)
        out.append({"budget": budget, "key": key, "leader": a, "runner_up": b, "d": d, "se": se,
                    "wins": se is not None and d > 2 * se})
    return out


def family_best(groups: list[dict], family: Callable[[str], str] | None = None, key: str = "bytes_total",
                budget: float = math.inf) -> dict[str, dict]:
    """Each method's (``family``'s) best (method, rank) by mean accuracy among the groups whose ``key`` bytes fit
    in ``budget``."""
    family = family or (lambda m: m)
    best: dict[str, dict] = {}
    for g in groups:
        f = family(g["method"])
        if g[key] <= budget and (f not in best or g["accuracy_mean"] > best[f]["accuracy_mean"]):
            best[f] = g
    return best


def group_difference(a: dict, b: dict) -> tuple[float, float | None]:
    """Two (method, rank) groups: the difference of their means and its standard error (None with fewer than 2
    seeds a side)."""
    d = a["accuracy_mean"] - b["accuracy_mean"]
    if min(a["seeds"], b["seeds"]) < 2:
        return d, None
    return d, math.sqrt(a["accuracy_std"] ** 2 / a["seeds"] + b["accuracy_std"] ** 2 / b["seeds"])


def budget_spans(items: list[tuple[int, float, Any]]) -> list[tuple[float, float, Any]]:
    """``(index, budget, what)`` items, ``index`` the budget's place in ``budget_leaders``: runs of consecutive
    budgets with the same ``what`` as one ``(first budget, last budget, what)``."""
    spans: list[list] = []  # [first budget, last budget, what, index of the last]
    for i, budget, what in items:
        if spans and spans[-1][2] == what and spans[-1][3] == i - 1:
            spans[-1][1], spans[-1][3] = budget, i
        else:
            spans.append([budget, budget, what, i])
    return [(lo, hi, what) for lo, hi, what, _ in spans]


def verdicts(groups: list[dict], key: str = "bytes_total", family: Callable[[str], str] | None = None) -> list[str]:
    """``budget_leaders`` as the markdown lines of ``compare.md``."""
    lines, family = [], family or (lambda m: m)
    for v in budget_leaders(groups, key, family):
        a, b, d, se = v["leader"], v["runner_up"], v["d"], v["se"]
        head = f"≤ {v['budget'] / 1e6:,.1f} MB {'total' if key == 'bytes_total' else 'of per-round traffic'}"
        if b is None:
            variant = "" if family(a["method"]) == a["method"] else f" ({family(a['method'])})"
            lines.append(f"- {head}: only {a['method']} r={a['rank']} fits{variant}")
            continue
        who = f"{a['method']} r={a['rank']} ({a['accuracy_mean']:.3f}) over {b['method']} r={b['rank']} ({b['accuracy_mean']:.3f})"
        if se is None:
            lines.append(f"- {head}: {who} by {d:.3f}: one seed, no standard error: not a claim")
        elif v["wins"]:
            lines.append(f"- {head}: **{family(a['method'])} wins**: {who} by {d:.4f} > 2 SE = {2 * se:.4f}")
        else:
            lines.append(f"- {head}: not resolved: {who} by {d:.4f} ≤ 2 SE = {2 * se:.4f}")
    return lines


def summarize(out: Path) -> list[dict]:
    """Read every run under ``out/select`` and ``out/runs``; write the csv, the markdown and the plots."""
    rows = [run_row(p.parent) for sub in ("select", "runs") for p in sorted((out / sub).glob("*/summary.json"))]
    write_summary(rows, out)
    return rows


def write_summary(rows: list[dict], out: Path, family: Callable[[str], str] | None = None) -> None:
    """``compare.csv``, ``compare.md``, ``pareto.png`` and ``curves.png`` in ``out`` from per-run rows (several
    comparisons' rows may be merged first, their ``method`` relabelled to tell variants apart)."""
    rows = sorted(rows, key=lambda r: (r["split"] != "validation", r["method"], r["rank"], r["lr"], r["seed"]))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "compare.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    groups = group_rows(rows)
    md = _table(GROUP_COLUMNS, groups) + ["", "Which method wins at each budget of total bytes, one-time costs included "
                                          "(best of its ranks within it):", "", *verdicts(groups, family=family)]
    if any(g["bytes_one_time"] for g in groups):
        md += ["", "The same by per-round traffic alone (what a long deployment pays once the one-time costs are "
               "amortized):", "", *verdicts(groups, "bytes_rounds", family)]
    sel = [r for r in rows if r["split"] == "validation"]
    if sel:
        md += ["", "Learning-rate selection (one run each, validation accuracy):", "",
               *_table(["method", "rank", "lr", "seed", "rounds", "final_accuracy"], sel)]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    try:
        _plots(out, groups, rows)
    except MissingExtra as e:  # hours of runs are not lost for a missing plotting library
        log.warning("%s; compare.csv and compare.md are written, the plots are not", e)


def _table(columns: list[str], rows: list[dict]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(f"{r[c]:g}" if c == "lr" else _fmt(r[c]) for c in columns) + " |" for r in rows)]


def _plots(out: Path, groups: list[dict], rows: list[dict]) -> None:
    matplotlib = require("matplotlib", "fedsb compare's pareto.png and curves.png", "plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (title, key) in zip(axes, (("total bytes (rounds + one-time), log scale", "bytes_total"),
                                      ("per-round bytes only (up + down), log scale", "bytes_rounds"))):
        for method in dict.fromkeys(g["method"] for g in groups):
            gs = sorted((g for g in groups if g["method"] == method), key=lambda g: g[key])
            ax.errorbar([g[key] for g in gs], [g["accuracy_mean"] for g in gs], yerr=[g["accuracy_std"] for g in gs],
                        marker="o", capsize=3, label=method)
            for g in gs:
                ax.annotate(f"r={g['rank']}", (g[key], g["accuracy_mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy (mean ± std over seeds)")
    axes[0].legend(fontsize=8)
    fig.suptitle("accuracy vs communication")
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for g in groups:
        by_round: dict[int, list[float]] = {}
        for r in rows:
            metrics = Path(r["run_dir"]) / "metrics.jsonl"  # absent for rows merged from a csv
            if r["split"] == "test" and (r["method"], r["rank"]) == (g["method"], g["rank"]) and metrics.exists():
                for line in metrics.read_text().splitlines():
                    rec = json.loads(line)
                    if rec["phase"] == "evaluate":
                        by_round.setdefault(rec["round"], []).append(rec["accuracy"])
        pts = sorted(by_round.items())
        ax.plot([p[0] for p in pts], [statistics.fmean(p[1]) for p in pts], marker="o", label=f"{g['method']} r={g['rank']}")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


__all__ = ["COLUMNS", "GROUP_COLUMNS", "group_rows", "mean_std", "run_row", "summarize", "verdicts", "write_summary"]
