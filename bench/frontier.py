"""The accuracy–communication frontier (issue 15, item 5): ``fedsb compare`` over ranks, learning rates
chosen per (method, rank) on a validation split, 3 seeds, on a comparison task sized to fit this 2-core
machine.

    python -m bench.frontier [--part nonprivate|private-eps1|private-eps3] [--arms fed-sb,fedit] [--extra KEYS]

How the task is sized (``SIZED`` below), against the default ``make run`` (about 3 min a run, see README):
- 2 clients sampled per round out of 10 (``fraction-train = 0.2``): the two Ray actors train in one wave on
  the two cores instead of two waves;
- ``max-length = 32`` tokens per example (the default's tweets: median 16 words, 90th percentile 24);
- one evaluation per run, after the last round, on the whole held-out set (``eval-max-samples = 0``,
  3,816 examples; a selection run evaluates on the whole validation slice instead), and none per round;
- selection runs last half as many rounds (``--select-rounds 5``).
Everything else (model, data, local steps, batch size, 10 rounds) is the default's. Each arm (one
method, or one Fed-SB initialization, over its ranks) keeps its run directories under
``runs/frontier-<part>/<arm>`` and resumes where it stopped; after each arm, the arms so far are merged into
``bench/results/frontier-<part>/`` (``compare.csv``, ``compare.md``, ``pareto.png``, ``commands.txt``) for
``python -m bench.report``.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

SIZED = {"fraction-train": 0.2, "max-length": 32, "num-server-rounds": 10, "eval-every": 10, "eval-max-samples": 0}
LRS = "2.5e-3|5e-3|1e-2"
# how ``fedsb compare`` chooses and repeats (the report's prose is written from these)
SELECTION = {"seeds": 3, "validation-fraction": 0.05, "select-rounds": 5, "max-extend": 1}
# Fed-SB's initialization as it was when the frontier ran (the defaults then), pinned so that the commands
# reproduce those runs after the defaults moved to init-fraction=0.5 basis-dtype=int4 (issue 14)
FED_SB_INIT = "init-fraction=1.0 basis-dtype='int8'"
LONG = {"num-server-rounds": 30, "eval-every": 30}
LONG_SELECTION = {"select-rounds": 15}
UPLOADS = (("", ""), ("-int8", "upload-dtype='int8'"))
# ServerAdam's eta: one ServerApp each in bench/compose.py (adam_<name>), chosen among on validation by compare
# (1e-1, Flower's FedAdam default, and then 3e-1 were added when the largest step so far came out best, at the
# grid's edge). Kept here, not in bench/compose.py, so that reading the parts does not import Flower.
ADAM_STEPS = {"3e_3": 3e-3, "1e_2": 1e-2, "3e_2": 3e-2, "1e_1": 1e-1, "3e_1": 3e-1}
ADAM_APPS = "|".join(f"bench.compose:adam_{name}" for name in ADAM_STEPS)
# A part is a set of arms, each one ``fedsb compare`` of one method over its ranks with its own keys; an arm's
# name labels its rows in the merged table (Fed-SB's initializations are arms of the same method).
PARTS = {
    "nonprivate": {"keys": {}, "arms": {
        "fed-sb": ("fed-sb", "16|32|64|128", FED_SB_INIT), "fedit": ("fedit", "4|8|16", ""), "ffa-lora": ("ffa-lora", "4|8|16", ""),
        "fedex-lora": ("fedex-lora", "4|8|16", ""), "flora": ("flora", "4|8|16", "")}},
    **{f"private-eps{eps}": {"keys": {"dp": True, "target-epsilon": float(eps)}, "arms": {
        "fed-sb": ("fed-sb", "32", FED_SB_INIT),  # the private client-gradient initialization
        "fed-sb-random": ("fed-sb", "32", f"init-basis='random' {FED_SB_INIT}"),
        "fed-sb-server": ("fed-sb", "32", f"init-source='server' {FED_SB_INIT}"),
        "fedit": ("fedit", "8", ""), "ffa-lora": ("ffa-lora", "8", "")}} for eps in (1, 3)},
    # The long horizon (issue 31): the same task for 30 rounds, so that each client trains in 6 of them on
    # average (2 of 10 a round), selection runs of 15; Fed-SB at today's initialization defaults.
    "long-nonprivate": {"keys": LONG, "selection": LONG_SELECTION, "families": True, "arms": {
        **{f"fed-sb{basis}{up}": ("fed-sb", "32|64", f"{bkeys} {ukeys}".strip())
           for basis, bkeys in (("", ""), ("-weights", "init-basis='weights'")) for up, ukeys in UPLOADS},
        **{f"{m}{up}": (m, ranks, ukeys) for m, ranks in (("ffa-lora", "4|16"), ("fedit", "4|8")) for up, ukeys in UPLOADS}}},
    "long-private-eps1": {"keys": {**LONG, "dp": True, "target-epsilon": 1.0}, "selection": LONG_SELECTION,
                          "families": True, "arms": {
        "fed-sb": ("fed-sb", "32", ""), "fed-sb-weights": ("fed-sb", "32", "init-basis='weights'"),
        "fed-sb-random": ("fed-sb", "32", "init-basis='random'"), "fedit": ("fedit", "8", ""),
        "ffa-lora": ("ffa-lora", "8", "")}},
    # The default run (`make run`'s configuration) with each zero-byte basis and quantized upload (issue 31),
    # each arm's rate chosen on validation like the frontier's.
    "default-uploads": {"keys": {}, "sized": {}, "selection": {"select-rounds": 0}, "arms": {
        "fed-sb": ("fed-sb", "32", ""), "fed-sb-weights": ("fed-sb", "32", "init-basis='weights'"),
        "fed-sb-weights-minor": ("fed-sb", "32", "init-basis='weights-minor'"),
        "fed-sb-int8": ("fed-sb", "32", "upload-dtype='int8'"), "fed-sb-int4": ("fed-sb", "32", "upload-dtype='int4'"),
        "fed-sb-weights-int8": ("fed-sb", "32", "init-basis='weights' upload-dtype='int8'"),
        "fed-sb-weights-int8-both": ("fed-sb", "32", "init-basis='weights' upload-dtype='int8' download-dtype='int8'")},
        # quantized uploads keep the rate their float32 arm chose on validation (the same method and rank: the
        # rate is tuned per (method, rank), the upload's rounding is unbiased)
        "arm_lrs": {"fed-sb-int8": "1e-2", "fed-sb-int4": "1e-2", "fed-sb-weights-int8": "1e-2",
                    "fed-sb-weights-int8-both": "1e-2"}},
    # User-level DP (issue 28): Flower's server-side adaptive clipping around fedsb's strategy
    # (bench/compose.py), 100 clients, 10 sampled a round, 30 rounds, the same ε for every method.
    "user-dp": {"keys": {**LONG, "fraction-train": 0.1, "min-available-nodes": 100}, "selection": LONG_SELECTION,
                "supernodes": 100, "server_app": "bench.compose:user_dp",
                "arms": {"fed-sb": ("fed-sb", "32", ""), "fedit": ("fedit", "8", "")}},
    # The server optimizer (issue 28) against plain averaging, on the frontier's task split non-IID (Dirichlet
    # α = 0.5 over labels). ServerAdam's step size is chosen on validation among ADAM_APPS (one ServerApp each) at
    # the client rate its plain arm chose on validation (arm_lrs), so every choice is made on validation.
    "server-adam": {"keys": {"partitioner": "'dirichlet'"}, "selection": {"select-rounds": 0}, "arms": {
        **{m: (m, r, "") for m, r in (("fed-sb", "32"), ("fedit", "8"))},
        **{f"{m}-adam": (m, r, "", ADAM_APPS) for m, r in (("fed-sb", "32"), ("fedit", "8"))}},
        # fed-sb's plain arm chose 5e-3 (runs/frontier-server-adam/fed-sb/select); fedit's plain arm has not run yet:
        # set fedit-adam's rate to its choice before running that arm
        "arm_lrs": {"fed-sb-adam": "5e-3", "fedit-adam": "2.5e-3"}},
}
RESULTS = Path("bench/results")


def command(part: str, arm: str, extra: str = "", rank: str = "", backend: str = "") -> str:
    """The ``fedsb compare`` command line of one arm of a part (``extra``: more run-config keys; ``rank``: one
    of the arm's ranks alone; ``backend``: compare's --backend)."""
    spec = PARTS[part]
    method, ranks, keys, *app = spec["arms"][arm]
    shared = {**spec.get("sized", SIZED), **spec["keys"]}
    rc = " ".join([*(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in shared.items()),
                   *keys.split(), *extra.split()])
    server_app = app[0] if app else spec.get("server_app", "")
    return (f"fedsb compare --methods {method} --num-supernodes {spec.get('supernodes', 10)} "
            f"--rank '{method}={rank or ranks}' --lr '{method}={spec.get('arm_lrs', {}).get(arm, LRS)}' "
            + "".join(f"--{k} {v} " for k, v in {**SELECTION, **spec.get("selection", {})}.items())
            + (f"--server-app '{server_app}' " if server_app else "") + (f"--backend {backend} " if backend else "")
            + f"--run-config \"{rc}\" --out runs/frontier-{part}/{arm}")


def merge(part: str, extra: str = "") -> None:
    """Every arm of the part that has runs, in one table and plot in bench/results/frontier-<part>/, with the
    commands. An arm with run directories here takes its rows from them; an arm without (another checkout
    ran it) keeps its rows from the merged csv, so re-running one arm never drops the others."""
    from lab.compare_report import read_rows, run_row, write_summary

    dest = RESULTS / f"frontier-{part}"
    kept = read_rows(dest / "compare.csv") if (dest / "compare.csv").exists() else []
    rows, ran = [], []
    for arm in PARTS[part]["arms"]:
        found = [{**run_row(p.parent), "method": arm} for sub in ("select", "runs")
                 for p in sorted(Path(f"runs/frontier-{part}/{arm}/{sub}").glob("*/summary.json"))]
        found = found or [r for r in kept if r["method"] == arm]
        rows += found
        ran += [arm] if found else []
    # variants of one method (its bases, upload dtypes) compete as that method in the verdicts of the parts that
    # ask for it; the older parts' tables keep each arm as its own contender, as they were rendered
    family = (lambda arm: PARTS[part]["arms"][arm][0]) if PARTS[part].get("families") else None
    write_summary(rows, dest, family)
    (dest / "commands.txt").write_text("".join(command(part, a, extra) + "\n" for a in ran))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=list(PARTS), default="nonprivate")
    p.add_argument("--arms", default="", help="comma-separated arms of the part (default: all, in order)")
    p.add_argument("--extra", default="", help="more run-config keys for every run, e.g. 'train-pooler=true'")
    args = p.parse_args()
    from server.cli import main as fedsb

    arms = [a.strip() for a in args.arms.split(",") if a.strip()] or list(PARTS[args.part]["arms"])
    bad = [a for a in arms if a not in PARTS[args.part]["arms"]]
    if bad:
        raise SystemExit(f"--arms: {bad} not in part {args.part} ({', '.join(PARTS[args.part]['arms'])})")
    for arm in arms:  # merged after each arm: the results grow as the sweep goes
        cmd = command(args.part, arm, args.extra)
        if fedsb(shlex.split(cmd)[1:]) != 0:  # exactly the command BENCHMARKS.md shows
            raise SystemExit(f"failed: {cmd}")
        merge(args.part, args.extra)


if __name__ == "__main__":
    main()
