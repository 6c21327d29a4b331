"""Nested ranks (issue 19): a mixed federation (a third each at r/4, r/2, r) against all clients at r and
all at r/4, on the default model and data; held-out accuracy over seeds and the measured upload per client.

    python -m bench.nested_ranks [--seeds 42 43 44] [--rounds 6] [--clients 6]

Each run: the default configuration with the keys below, evaluated on the whole held-out set after the
last round; results saved after every run (bench/results/nested_ranks.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import machine

PATH = Path("bench/results/nested_ranks.json")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--runs", default="runs/nested-ranks")
    args = p.parse_args()
    from server.simulation import simulate

    r = args.rank
    variants = {"mixed r/4, r/2, r": f"{r // 4},{r // 2},{r}", f"all at r={r}": "", f"all at r/4={r // 4}": None}
    base = {"num-server-rounds": args.rounds, "eval-max-samples": 0, "eval-every": args.rounds, "fraction-train": 0.5,
            "rank": r}
    out = json.loads(PATH.read_text()) if PATH.exists() else {
        "what": "nested ranks: mixed federation vs uniform ranks, default model", "base_keys": base,
        "clients": args.clients, "rows": []}
    for seed in args.seeds:
        for name, ranks in variants.items():
            if any(row["variant"] == name and row["seed"] == seed for row in out["rows"]):
                continue
            keys = dict(base, seed=seed, **({"client-ranks": ranks} if ranks is not None else {"rank": r // 4}),
                        **{"output-dir": str(Path(args.runs).resolve() / f"{name.split()[0]}-{name.split()[-1]}-s{seed}")})
            t0 = time.time()
            run = simulate(keys, args.clients)
            s = json.loads((run / "summary.json").read_text())
            out["rows"].append({"variant": name, "seed": seed, "accuracy": s["final_accuracy"],
                                "rank_mix": s.get("rank_mix"), "bytes_up_per_client_round": s["bytes_up_per_client_round"],
                                "bytes_one_time_per_client": s.get("bytes_one_time_per_client"),
                                "seconds": round(time.time() - t0, 1)})
            out["machine"] = machine()
            PATH.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
