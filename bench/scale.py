"""Scale: simulated clients 10 -> 100 -> 1000 with a tiny model (every client sampled, 1 local step):
server seconds per round and the server's peak allocation during a round (tracemalloc), Fed-SB vs FedIT.
Goal: the aggregation's memory does not grow with the number of clients (replies are streamed into a
running sum; FedIT streams too, FedEx-LoRA/FLoRA cannot).

    python -m bench.scale [--clients 10,100,1000] [--methods fed-sb,fedit] [--out bench/results/scale.json]

Round 1 is reported apart from the later rounds: Fed-SB's round 1 also ships each client the basis once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ["FEDSB_TRACE_MEMORY"] = "1"
os.environ.setdefault("FEDSB_PROGRESS", "0")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", default="10,100,1000")
    p.add_argument("--methods", default="fed-sb,fedit")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="bench/results/scale.json")
    args = p.parse_args()
    from server.simulation import simulate
    from lab.tiny import make_sentiment_csv, make_tiny_bert, tiny_run_config

    tmp = Path(tempfile.mkdtemp(prefix="fedsb-scale-"))
    model, data = make_tiny_bert(tmp / "tiny"), make_sentiment_csv(tmp / "data.csv", n=6000)
    rows = []
    for n in [int(x) for x in args.clients.split(",")]:
        for method in args.methods.split(","):
            cfg = tiny_run_config(model, data, tmp / f"{method}-{n}", **{
                "method": method, "num-server-rounds": args.rounds, "local-steps": 1, "batch-size": 4,
                "fraction-train": 1.0, "min-available-nodes": n, "init-samples": 4, "eval-max-samples": 50,
                "test-fraction": 0.05, "round-timeout": 1200.0})
            run_dir = simulate(cfg, n)
            recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
            train = [r for r in recs if r["phase"] == "train"]
            rows.append({"clients": n, "method": method, "replies": [r["replies"] for r in train],
                         "round_seconds": [r["seconds"] for r in train],
                         "round_seconds_median": statistics.median(r["seconds"] for r in train),
                         "server_peak_bytes_max": max(r["server_peak_bytes"] for r in train),
                         "bytes_up_per_client": train[-1]["bytes_up_per_client"]})
            print(json.dumps(rows[-1]), flush=True)
            # saved after every run: the 1000-client runs take minutes each
            Path(args.out).write_text(json.dumps({"what": "server round cost vs clients (tiny BERT, 1 local step)",
                                                  "rounds": args.rounds, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
