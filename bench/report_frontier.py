"""BENCHMARKS.md sections of issue 15: the pooler study (frozen, trained, adapted) and the accuracy–communication
frontier over ranks, tuned learning rates and seeds. Rendered by ``bench.report``."""

from __future__ import annotations

import statistics

from bench.report_common import R, _load, _missing
from bench.report_variants import _difference, _mean_std, _versus


def pooler_section() -> list[str]:
    """Issue 15 item 4: the [CLS] pooler frozen (the default), trained with the head or adapted, over seeds."""
    pl = _load("pooler.json")
    out = ["## The classification head: the `[CLS]` pooler frozen, trained or adapted", ""]
    if not pl:
        return out + _missing("python -m bench.pooler --sized")
    keys = " ".join(f"{k}={v}" for k, v in pl["base_keys"].items())
    out += [f"Command: `python -m bench.pooler --sized [--methods M] [--rank R] [--lr LR]` ({pl['what']}; keys `{keys}`; "
            "the whole held-out set; each method at one rank and learning rate for all its variants). `frozen`: the pretrained pooler as "
            "it is; `trained`: `train-pooler=true`, the pooler trains in full with the head and is sent every round; "
            "`adapted`: `pooler.dense` added to `target-modules`, the method adapts it like every block layer.", "",
            "| method, rank, lr | pooler | held-out accuracy (mean ± std) | communicated parameters | upload / client / round |",
            "|---|---|---|---|---|"]
    by: dict[tuple, list[dict]] = {}
    for r in pl["rows"]:
        by.setdefault((f"{r['method']} r={r['rank']} lr={r['lr']:g}", r["pooler"]), []).append(r)
    order = {"frozen": 0, "trained": 1, "adapted": 2}
    for (method, v), rs in sorted(by.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])):
        out.append(f"| {method} | {v} | {_mean_std([r['accuracy'] for r in rs])} | "
                   f"{rs[0]['communicated_params']:,} | {rs[0]['bytes_up_per_client_round']:,.0f} |")
    out.append("")
    beyond = []
    for method in dict.fromkeys(m for m, _ in by):
        frozen = [r["accuracy"] for r in by.get((method, "frozen"), [])]
        for v in ("trained", "adapted"):
            if (method, v) in by:
                accs = [r["accuracy"] for r in by[(method, v)]]
                out.append("- " + _versus(f"{method} {v} pooler", accs, "frozen", frozen))
                if len(accs) > 1 and len(frozen) > 1:
                    d, se = _difference(accs, frozen)
                    if d > 2 * se:
                        beyond.append(f"{method} {v}")
    means = {k: statistics.mean(r["accuracy"] for r in rs) for k, rs in by.items()}
    best = max(means.values())
    stuck = sorted({m for (m, v), a in means.items() if v == "frozen" and a < best - 0.1})
    if stuck:
        out += ["", f"{', '.join(stuck)}: more than 0.1 below the best row with the frozen pooler, at a rate that was not "
                "tuned for this task: these rows say nothing about the head; the "
                "frontier below tunes each method's rate."]
    out += ["", ("Beyond the seed spread: " + ", ".join(beyond) + "." if beyond else
                 "No variant is better than the frozen pooler beyond the seed spread, so the default stays `train-pooler=false` "
                 "with the block layers only: the cheapest head, and what every method sends is unchanged.")]
    return out + [""]


def one_time_shares(groups: list[dict]) -> dict[str, float]:
    """Each (method, rank)'s one-time bytes as a share of its total bytes (means over seeds), where it has any."""
    return {f"{g['method']} r={g['rank']}": g["bytes_one_time"] / g["bytes_total"]
            for g in sorted(groups, key=lambda g: (g["method"], g["rank"])) if g["bytes_one_time"]}


FRONTIER_PARTS = ("nonprivate", "private-eps1", "private-eps3", "long-nonprivate", "long-private-eps1")
LONG_ABOUT = (
    "The same task for 30 rounds instead of 10, so that each client trains in 6 rounds on average (2 of 10 a round), "
    "where the one-time costs are amortized; selection runs last 15 rounds. Each variant of a method (Fed-SB's basis: "
    "the clients' gradients, today's default, or `init-basis=weights`, nothing sent; `upload-dtype=int8` or float32) chose "
    "its own rate, and in the verdicts the variants of one method compete as that method (the best of them within the "
    "budget). Runs: `python -m bench.sweep --parts long-nonprivate,long-private-eps1 --jobs N` runs the same commands "
    "in parallel over the in-process backend (`fedsb compare --backend inprocess`); most of these runs ran that way on "
    "an NVIDIA H200 (16 cores, CUDA), the rest on this 2-core machine (each run's summary.json names its versions; the "
    "seeds of one arm may mix the two)."
)


def frontier_section() -> list[str]:
    """Issue 15 item 5: the frontier from ``bench.frontier``, non-private and private parts."""
    from bench.frontier import LRS, PARTS, SELECTION, SIZED
    from lab.compare_report import group_rows, read_rows
    from fedsb.config import FedSBConfig

    seed, n = FedSBConfig().seed, SELECTION["seeds"]  # compare's seeds: the config's seed, then the next ones
    seeds = ", ".join(str(seed + k) for k in range(n))
    extend = {0: "never extended", 1: "extended once by 2×"}.get(SELECTION["max-extend"],
                                                                 f"extended up to {SELECTION['max-extend']} times by 2×")
    keys = " ".join(f"{k}={v}" for k, v in SIZED.items())
    out = [f"## The accuracy–communication frontier (tuned per method and rank, {n} seeds)", "",
           f"The comparison task: the default model and data with `{keys}`; 10 clients, 10 rounds of 10 local steps of "
           "16 examples. Sized for this 2-core machine (see `bench/frontier.py`): two clients a round train in one wave "
           "on the two cores, 32 tokens cover most of the short texts, and the whole held-out set is evaluated once per "
           "run, after the last round. Each (method, rank) chose its learning rate among "
           f"{LRS.replace('|', ', ')} on a {SELECTION['validation-fraction']:.0%} "
           f"validation split carved from the training data before partitioning ({SELECTION['select-rounds']}-round "
           f"selection runs, seed {seed}; the grid {extend} when the best rate was at an edge: `lr_at_edge` says it "
           f"stayed there); the final runs use seeds {seeds}. Bytes are up + down over the whole run, all clients; `bytes_one_time` is "
           "Fed-SB's init upload and basis download. Each table and its verdicts are rendered from the runs by "
           "`lab.compare_report`: a method wins a budget only by more than two standard errors.", ""]
    for part in FRONTIER_PARTS:
        spec = PARTS[part]
        d = R / f"frontier-{part}"
        eps = spec["keys"].get("target-epsilon")
        title = ("Non-private" if eps is None else f"Private, ε = {eps:g} (DP-SGD on clients)")
        if part.startswith("long-"):
            title = f"{title}, the long horizon ({spec['keys']['num-server-rounds']} rounds)"
        out += [f"### {title}", ""]
        if part.startswith("long-"):
            out += [LONG_ABOUT, ""]
        if not (d / "compare.md").exists():
            out += _missing(f"python -m bench.frontier --part {part}")
            continue
        rows = read_rows(d / "compare.csv")
        test = [r for r in rows if r["split"] == "test"]
        out += ["Commands (`python -m bench.frontier --part " + part + "` runs them in turn):", "",
                *(f"- `{c}`" for c in (d / "commands.txt").read_text().split("\n") if c), "",
                f"![{part}](bench/results/frontier-{part}/pareto.png)", ""]
        out += (d / "compare.md").read_text().strip().splitlines() + [""]
        share = one_time_shares(group_rows(rows))
        if share:
            shape = {**SIZED, **spec["keys"]}
            per_client = shape["fraction-train"] * shape["num-server-rounds"]
            out.append("Fed-SB's one-time bytes (the int8 basis, and the clients' 1-bit init upload unless the server's data made "
                       "the basis) are this share of its "
                       "total: " + ", ".join(f"{k} {v:.0%}" for k, v in share.items())
                       + f". On this task a client trains in about {per_client:g} of "
                       "the rounds, so the one-time cost is paid for few rounds; the per-round verdicts show the other "
                       "end, a deployment long enough to amortize it.")
            out.append("")
        out.append(f"{len(test)} held-out runs and {len(rows) - len(test)} selection runs; median "
                   f"{statistics.median(r['seconds'] for r in rows):.0f} s of server time per run.")
        short = sorted({r["method"] for r in test if sum(x["method"] == r["method"] for x in test) < n * len(
            spec["arms"][r["method"]][1].split("|"))})
        missing = [a for a in spec["arms"] if a not in {r["method"] for r in test}]
        if short:
            out += ["", f"**Incomplete:** {', '.join(short)} have fewer than {n} seeds at some rank (the session's time ran "
                    f"out; `python -m bench.frontier --part {part} --arms {','.join(short)}` resumes them)."]
        if missing:
            out += ["", f"**Not run yet:** {', '.join(missing)} (`python -m bench.frontier --part {part} --arms "
                    f"{','.join(missing)}`, resumable)."]
        out.append("")
    return out


__all__ = ["frontier_section", "one_time_shares", "pooler_section"]
