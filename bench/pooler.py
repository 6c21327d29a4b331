"""Why the default classification head is weak (issue 15, item 4): the same run with the frozen [CLS]
pooler (today), with the pooler trained in full alongside the head (``train-pooler=true``), and with the
pooler's dense layer adapted by the method like every block layer (``target-modules`` + ``pooler.dense``),
each counted in what the method sends, for each method, over seeds, on the whole held-out set.

    python -m bench.pooler [--methods fed-sb fedit] [--seeds 42 43 44] [--rounds 10] [--sized]

``--sized``: on the comparison task of ``bench.frontier`` (2 clients a round, 32 tokens), about half the time.

Results: bench/results/pooler.json, saved after every run (a long sweep can be resumed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import machine

PATH = Path("bench/results/pooler.json")
# frozen: today's default; trained: the pooler trains in full with the head (train-pooler); adapted: the
# pooler's dense layer is one more target of the method's adapter (Fed-SB: r² more numbers, not 384²)
VARIANTS = {"frozen": {}, "trained": {"train-pooler": True},
            "adapted": {"target-modules": "query,key,value,attention.output.dense,intermediate.dense,output.dense,"
                                          "pooler.dense"}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", nargs="+", default=["fed-sb", "fedit"])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--runs", default="runs/pooler")
    p.add_argument("--lr", type=float, default=5e-3, help="learning rate of every run (the default's 5e-3)")
    p.add_argument("--rank", type=int, default=0, help="adapter rank (0: 32 for Fed-SB, 24 for the LoRA methods)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--sized", action="store_true", help="the comparison task of bench.frontier (SIZED keys)")
    args = p.parse_args()
    from server.simulation import simulate

    base = {"num-server-rounds": args.rounds, "eval-max-samples": 0, "eval-every": args.rounds}
    if args.sized:
        from bench.frontier import SIZED

        base.update(SIZED)
    out = json.loads(PATH.read_text()) if PATH.exists() else {"what": "the [CLS] pooler frozen, trained or adapted, " + (
        "the comparison task of bench.frontier" if args.sized else "default run"), "base_keys": base, "rows": []}
    if out["base_keys"] != base:
        raise SystemExit(f"{PATH} holds rows run with other keys ({out['base_keys']}); move it away to start over")
    for seed in args.seeds:
        for method in args.methods:
            for pooler in args.variants:
                rank = args.rank or (32 if method == "fed-sb" else 24)
                if any((r["method"], r["seed"], r["pooler"], r["lr"], r["rank"]) == (method, seed, pooler, args.lr, rank)
                       for r in out["rows"]):
                    continue
                keys = dict(base, method=method, seed=seed, rank=rank, **VARIANTS[pooler], **{
                    "learning-rate": args.lr, "output-dir": str(
                        Path(args.runs).resolve() / f"{method}-r{rank}-lr{args.lr:g}-pooler-{pooler}-s{seed}")})
                t0 = time.time()
                s = json.loads((simulate(keys, 10) / "summary.json").read_text())
                out["rows"].append({"method": method, "rank": rank, "lr": args.lr, "seed": seed, "pooler": pooler,
                                    "train_pooler": keys.get("train-pooler", False),
                                    "accuracy": s["final_accuracy"], "communicated_params": s["communicated_params"],
                                    "bytes_up_per_client_round": s["bytes_up_per_client_round"],
                                    "seconds": round(time.time() - t0, 1)})
                out["machine"] = machine()
                PATH.write_text(json.dumps(out, indent=2))

if __name__ == "__main__":
    main()
