"""A real federated run of SmolLM2-135M-Instruct with Fed-SB on GSM-style math (CPU, 2 cores).
Writes bench/results/smollm2.json: held-out loss, perplexity and exact match before/after, bytes.

    python -m bench.smollm2 [--num-supernodes 3] [--run-config "..."]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

DEFAULT = ("task='causal-lm' dataset='gsm' num-examples=400 max-length=192 rank=16 init-samples=8 "
           "num-server-rounds=3 local-steps=6 batch-size=4 learning-rate=0.002 fraction-train=1.0 "
           "eval-max-samples=32 eval-generate-samples=16 max-new-tokens=96 test-fraction=0.1")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-supernodes", type=int, default=3)
    p.add_argument("--run-config", default=DEFAULT)
    p.add_argument("--out", default="bench/results/smollm2.json")
    args = p.parse_args()
    from server.simulation import parse_run_config, simulate

    cfg = parse_run_config(args.run_config)
    cfg["output-dir"] = str(Path(tempfile.mkdtemp(prefix="fedsb-smollm2-")) / "run")
    t0 = time.time()
    run = simulate(cfg, args.num_supernodes)
    s = json.loads((run / "summary.json").read_text())
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    out = {"what": "SmolLM2-135M-Instruct, Fed-SB, GSM-style math", "command": f"python -m bench.smollm2 --num-supernodes {args.num_supernodes} --run-config \"{args.run_config}\"",
           "wall_seconds": time.time() - t0, "summary": {k: s[k] for k in (
               "initial_loss", "final_loss", "final_perplexity", "initial_exact_match", "final_exact_match",
               "bytes_up_per_client_round", "bytes_up_floor_per_client_round", "bytes_basis_total", "bytes_init_total",
               "trainable_params", "adapted_layers", "seconds")},
           "evaluate": [{k: r.get(k) for k in ("round", "loss", "perplexity", "exact_match")} for r in recs if r["phase"] == "evaluate"]}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
