"""The accuracy–communication frontier (issue 15, item 5): ``fedsb compare`` over ranks, learning rates
chosen per (method, rank) on a validation split, 3 seeds, on a comparison task sized to fit this 2-core
machine.

    python -m bench.frontier [--part nonprivate] [--methods fed-sb,fedit,ffa-lora] [--out runs/frontier-nonprivate]

How the task is sized (``SIZED`` below), against the default ``make run`` (one run ≈ 2.6 min):
- 2 clients sampled per round out of 10 (``fraction-train = 0.2``): the two Ray actors train in one wave on
  the two cores instead of two waves;
- ``max-length = 32`` tokens per example (the default's tweets: median 16 words, 90th percentile 24);
- one evaluation per run, after the last round, on the whole held-out set (``eval-max-samples = 0``,
  3,816 examples; a selection run evaluates on the whole validation slice instead), and none per round;
- selection runs last half as many rounds (``--select-rounds 5``).
Everything else (model, data, local steps, batch size, 10 rounds) is the default's. Each part keeps its
run directories under ``--out`` and resumes where it stopped; its ``compare.csv``, ``compare.md`` and
``pareto.png`` are copied to ``bench/results/frontier-<part>/`` after each method, for ``python -m bench.report``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

SIZED = {"fraction-train": 0.2, "max-length": 32, "num-server-rounds": 10, "eval-every": 10, "eval-max-samples": 0}
LRS = "2.5e-3|5e-3|1e-2"
PARTS = {
    # the non-private frontier: Fed-SB at r in {16..128} against the LoRA methods at r in {4, 8, 16}
    "nonprivate": {"ranks": {"fed-sb": "16|32|64|128", "fedit": "4|8|16", "ffa-lora": "4|8|16",
                             "fedex-lora": "4|8|16", "flora": "4|8|16"}, "keys": {}},
}
RESULTS = Path("bench/results")


def command(part: str, methods: list[str]) -> str:
    """The ``fedsb compare`` command line equivalent to this part (for BENCHMARKS.md)."""
    spec = PARTS[part]
    keys = {**SIZED, **spec["keys"]}
    rc = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in keys.items())
    ranks = ",".join(f"{m}={spec['ranks'][m]}" for m in methods)
    lrs = ",".join(f"{m}={LRS}" for m in methods)
    return (f"fedsb compare --methods {','.join(methods)} --num-supernodes 10 --rank '{ranks}' --lr '{lrs}' --seeds 3 "
            f"--validation-fraction 0.05 --select-rounds 5 --max-extend 1 --run-config \"{rc}\" --out runs/frontier-{part}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=list(PARTS), default="nonprivate")
    p.add_argument("--methods", default="fed-sb,fedit,ffa-lora")
    p.add_argument("--out", default="")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from server.compare import Comparison, parse_lrs, parse_ranks

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    spec = PARTS[args.part]
    out = Path(args.out or f"runs/frontier-{args.part}")
    dest = RESULTS / f"frontier-{args.part}"
    for method in methods:  # one (method) at a time, so the results in bench/results grow as the sweep goes
        done = methods[: methods.index(method) + 1]
        Comparison(done, 10, out, {**SIZED, **spec["keys"]},
                   parse_ranks(",".join(f"{m}={spec['ranks'][m]}" for m in done), done),
                   parse_lrs(",".join(f"{m}={LRS}" for m in done), done),
                   seeds=3, validation_fraction=0.05, select_rounds=5, max_extend=1).run()
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("compare.csv", "compare.md", "pareto.png"):
            if (out / name).exists():
                shutil.copy(out / name, dest / name)
        (dest / "command.txt").write_text(command(args.part, done) + "\n")


if __name__ == "__main__":
    main()
