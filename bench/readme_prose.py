"""README's measured sentences, rendered from ``bench/results`` so that no number in them is typed by hand:
what the default initialization costs (issue 14) and what each part of the accuracy–communication frontier
resolved (issue 15). ``bench/tests/test_readme_prose.py`` checks that README holds the current rendering.

    python -m bench.readme_prose     # rewrites README's <!-- prose:NAME:start --> ... <!-- prose:NAME:end --> blocks
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

from bench.report_common import R, _load
from bench.report_variants import _difference, _mean_std, _paired, _versus


def one_time() -> str:
    """The default's one-time cost in rounds of its R upload, its total traffic against FedIT, its accuracy."""
    from bench.init_variants import default_variant

    by = {r["variant"]: r for r in (_load("init_bytes.json") or {}).get("rows", [])}
    name = default_variant()
    if name not in by:
        return "*Not measured yet: run `python -m bench.init_variants bytes`.*"
    d = by[name]
    basis, signs = (d[k] / d["round_upload_bytes"] for k in ("basis_download_bytes", "init_upload_bytes"))
    text = (f"What the default costs, measured (BENCHMARKS.md): a client asked for its init signs pays "
            f"{d['rounds_equivalent']:.1f} rounds of its R upload once (the {d['keys']['basis-dtype']} basis {basis:.1f}, "
            f"the signs {signs:.1f})")
    if d["init_share"] < 1:
        text += f", a client not asked {basis:.1f}; over all clients, {d['rounds_equivalent_mean']:.1f} rounds on average."
    else:
        text += "."
    if (R / "traffic_compare.csv").exists():
        rows = {r["method"]: r for r in csv.DictReader((R / "traffic_compare.csv").open())}
        if "fed-sb" in rows and "fedit" in rows:
            ratio = int(rows["fed-sb"]["bytes_total"]) / int(rows["fedit"]["bytes_total"])
            text += (f" The whole default run ({rows['fed-sb']['rounds']} rounds) moved {ratio:.3f} of FedIT "
                     f"r={rows['fedit']['rank']}'s bytes, one-time costs included.")
    acc_data = _load("init_accuracy.json")
    acc: dict[str, list[float]] = {}
    for r in (acc_data or {}).get("rows", []):
        acc.setdefault(r["variant"], []).append(r["accuracy"])
    if len(acc.get(name, [])) > 1 and len(acc.get("dense-f32", [])) > 1:
        diff, se = _difference(acc[name], acc["dense-f32"])
        text += (f" Held-out accuracy over {len(acc[name])} seeds was {'within' if abs(diff) <= 2 * se else 'beyond'} "
                 "the seed spread of the dense float32 basis")
        seeds = _paired(acc_data, name, "dense-f32")
        if seeds and (all(x < 0 for x in seeds) or all(x > 0 for x in seeds)):
            gaps = sorted(abs(x) for x in seeds)
            lo, hi = gaps[0], gaps[-1]
            text += f", though it was {'lower' if seeds[0] < 0 else 'higher'} on each seed, by {lo:.3f} to {hi:.3f}"
        text += "."
    return text


def _label(g: dict) -> str:
    return f"{g['method']} r={g['rank']}"


def _wins(leaders: list[dict]) -> str:
    """The budgets a method won beyond 2 SE, consecutive budgets with the same pair written as one range."""
    from lab.compare_report import budget_spans

    spans = budget_spans([(i, v["budget"], (_label(v["leader"]), _label(v["runner_up"])))
                          for i, v in enumerate(leaders) if v["wins"]])
    if not spans:
        return "none"
    return "; ".join(f"{a} over {b} at ≤ {lo / 1e6:.1f}" + (f"–{hi / 1e6:.1f}" if hi != lo else "") + " MB"
                     for lo, hi, (a, b) in spans)


def frontier() -> str:
    """One bullet per part of ``bench.frontier``: best mean, what is resolved by total bytes and by per-round
    traffic, each method's bytes per run, Fed-SB's one-time share, and the rates left at a grid edge."""
    from bench.frontier import PARTS
    from bench.report_frontier import FRONTIER_PARTS, long_goal, one_time_shares
    from lab.compare_report import budget_leaders, group_rows, read_rows

    bullets = []
    for part in FRONTIER_PARTS:
        spec = PARTS[part]
        path = R / f"frontier-{part}" / "compare.csv"
        eps = spec["keys"].get("target-epsilon")
        title = "Non-private" if eps is None else f"Private, ε = {eps:g}"
        if part.startswith("long-"):
            title += f", {spec['keys']['num-server-rounds']} rounds"
        family = (lambda arm, spec=spec: spec["arms"][arm][0]) if spec.get("families") else None
        if not path.exists():
            bullets.append(f"- **{title}**: not run yet (`python -m bench.frontier --part {part}`).")
            continue
        rows = read_rows(path)
        groups = group_rows(rows)
        best = max(groups, key=lambda g: g["accuracy_mean"])
        seeds = sorted({g["seeds"] for g in groups})
        text = (f"- **{title}** ({', '.join(dict.fromkeys(g['method'] for g in groups))}; "
                f"{'/'.join(map(str, seeds))} seeds each): best mean {_label(best)} {best['accuracy_mean']:.3f} ± "
                f"{best['accuracy_std']:.3f}. Beyond two standard errors, by total bytes: "
                f"{_wins(budget_leaders(groups, family=family))}")
        if any(g["bytes_one_time"] for g in groups):
            text += f"; by per-round traffic alone: {_wins(budget_leaders(groups, 'bytes_rounds', family))}"
        text += ". Total bytes per run: " + ", ".join(
            f"{m} {min(v) / 1e6:.1f}" + (f"–{max(v) / 1e6:.1f}" if max(v) > min(v) * 1.005 else "") + " MB"
            for m, v in _by_method(groups, "bytes_total").items()) + "."
        share = one_time_shares(groups)
        if share:
            text += " Fed-SB's one-time share of its total: " + ", ".join(f"{k} {v:.0%}" for k, v in share.items()) + "."
        test = [r for r in rows if r["split"] == "test"]
        runs = {(m, k): [r["final_accuracy"] for r in test if (r["method"], r["rank"]) == (m, k)]
                for m, k in {(r["method"], r["rank"]) for r in test}}
        arms = [_versus(f"{m} r={k}", v, f"fed-sb r={k}", runs[("fed-sb", k)]) for (m, k), v in sorted(runs.items())
                if m.startswith("fed-sb-") and ("fed-sb", k) in runs]
        if arms:
            text += " Fed-SB's other bases against its client-gradient basis: " + "; ".join(arms) + "."
        if part.startswith("long-"):  # issue 31's goal for the part, its verdict alone (BENCHMARKS has the margins)
            text += " " + long_goal(part, rows)[0].split(".**")[0].replace("**", "") + "."
        edge = [f"{_label(g)} ({g['lr']:g})" for g in groups if g["lr_at_edge"]]
        if edge:
            text += " Rate still at its grid's edge: " + ", ".join(edge) + "."
        bullets.append(text)
    return "\n".join(bullets)


def _by_method(groups: list[dict], key: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for g in groups:
        out.setdefault(g["method"], []).append(g[key])
    return out


def composition() -> str:
    """User-level DP (Flower's adaptive-clipping wrapper) Fed-SB against FedIT, and ServerAdam against averaging:
    each arm's mean ± std over its seeds and whether the difference exceeds two standard errors."""
    from bench.report_uploads import _arms, _eps

    out = []
    for part, what, pairs in (("user-dp", "User-level DP (Flower's `DifferentialPrivacyServerSideAdaptiveClipping`, "
                               "100 clients, 10 a round, 30 rounds)", (("fed-sb", "fedit"),)),
                              ("server-adam", "ServerAdam against plain averaging (non-IID split, server step chosen "
                               "on validation)", (("fed-sb-adam", "fed-sb"), ("fedit-adam", "fedit")))):
        arms = _arms(part) or {}
        if not arms:
            out.append(f"- **{what}**: not measured yet (`python -m bench.frontier --part {part}`).")
            continue
        text = f"- **{what}**: " + "; ".join(
            f"{arm} r={rs[0]['rank']} {_mean_std([r['final_accuracy'] for r in rs])}" for arm, rs in arms.items())
        eps = _eps([r for rs in arms.values() for r in rs])
        text += (f" at ε = {eps} (δ = 1e-5)" if eps != "not reported" else "") + "."
        verdicts = [_versus(a, [r["final_accuracy"] for r in arms[a]], b, [r["final_accuracy"] for r in arms[b]])
                    for a, b in pairs if a in arms and b in arms]
        text += "".join(f" {v}." for v in verdicts)
        out.append(text)
    return "\n".join(out)


BLOCKS = {"one-time": one_time, "frontier": frontier, "composition": composition}


def render(readme: str) -> str:
    """``readme`` with every prose block replaced by its current rendering (a block it lacks is an error)."""
    for name, fn in BLOCKS.items():
        start, end = f"<!-- prose:{name}:start -->", f"<!-- prose:{name}:end -->"
        if start not in readme or end not in readme:
            raise ValueError(f"README.md has no {start} ... {end} block: add the two markers where it belongs")
        readme = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{fn()}\n{end}", readme, flags=re.S)
    return readme


if __name__ == "__main__":
    p = Path("README.md")
    p.write_text(render(p.read_text()))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger(__name__).info("README.md: prose blocks %s rendered from bench/results", ", ".join(BLOCKS))
