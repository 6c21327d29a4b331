"""Private comparison on the default task: Fed-SB vs FFA-LoRA vs FedIT under DP-SGD at several ε
(same clients, partitions, seeds and rounds for all). Writes bench/results/private_compare.json.

    python -m bench.private_compare [--eps 1,3,10] [--methods fed-sb,ffa-lora,fedit,fed-sb:random] [--num-supernodes 6]
        [--run-config "num-server-rounds=4 ..."] [--merge] [--run-index K]

``--run-index K --merge`` repeats cells under the same settings (DP noise and Poisson batches come from OS
entropy, so a repeat is a fresh draw): the report then shows each cell's mean and its run-to-run spread.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--eps", default="1,3,10")
    p.add_argument("--methods", default="fed-sb,ffa-lora,fedit")
    p.add_argument("--num-supernodes", type=int, default=6)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--run-config", default="num-server-rounds=4 fraction-train=0.5 local-steps=10 batch-size=16")
    p.add_argument("--out", default="bench/results/private_compare.json")
    p.add_argument("--merge", action="store_true", help="keep the rows of other ε already in --out (same settings)")
    p.add_argument("--run-index", type=int, default=0, help="label of this repeat (rows of other indices are kept by --merge)")
    args = p.parse_args()
    from server.simulation import parse_run_config, simulate

    base = parse_run_config(args.run_config)
    tmp = Path(tempfile.mkdtemp(prefix="fedsb-private-"))
    rows = []
    out = {"what": "DP-SGD comparison on the default task (MiniLM, tweet sentiment)", "num_supernodes": args.num_supernodes,
           "run_config": base, "lora_rank": args.lora_rank, "rows": rows}

    def save() -> None:
        # written after every run: a long comparison cut short keeps what it measured
        res = out
        if args.merge:
            from bench.common import merge_rows

            res = merge_rows(args.out, out, key=lambda r: (r["method"], r["target_epsilon"], r.get("run", 0)))
            res["rows"].sort(key=lambda r: (r["target_epsilon"], r["method"], r.get("run", 0)))
        Path(args.out).write_text(json.dumps(res, indent=1))

    for eps in [float(e) for e in args.eps.split(",")]:
        for label in args.methods.split(","):
            # "fed-sb:random" is Fed-SB with init-basis=random (no private init step)
            method, _, init_basis = label.partition(":")
            cfg = dict(base, method=method, dp=True, **{"target-epsilon": eps, "output-dir": str(tmp / f"{method}-{init_basis}-{eps}")})
            if init_basis:
                cfg["init-basis"] = init_basis
            if method != "fed-sb":
                cfg["rank"] = args.lora_rank
            t0 = time.perf_counter()
            run = simulate(cfg, args.num_supernodes)
            s = json.loads((run / "summary.json").read_text())
            rows.append({"method": label, "target_epsilon": eps, "run": args.run_index, "epsilon": s["epsilon"], "delta": s["delta"],
                         "noise_multiplier": s["noise_multiplier"], "rank": s["config"]["rank"],
                         "final_accuracy": s["final_accuracy"], "initial_accuracy": s["initial_accuracy"],
                         "majority_rate": s["majority_rate"], "bytes_up_total": s["bytes_up_total"],
                         "bytes_up_per_client_round": s["bytes_up_per_client_round"],
                         "trainable_params": s["trainable_params"], "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
            save()


if __name__ == "__main__":
    main()
