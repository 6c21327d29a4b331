"""Measured effect of options on the default task, each against the same baseline run (same clients,
partitions, seeds, rounds): SecAgg+ (extra bytes and seconds per round), a bfloat16 basis broadcast and
initialization from a sampled subset of clients (one-time bytes and accuracy).
Writes bench/results/options.json.

    python -m bench.options [--num-supernodes 6] [--run-config "num-server-rounds=3 ..."]
        [--variants basis-bfloat16,init-fraction-0.34] [--merge]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

VARIANTS = {
    "baseline": {},
    "secagg": {"secagg": True},
    "basis-bfloat16": {"basis-dtype": "bfloat16"},
    "init-fraction-0.34": {"init-fraction": 0.34},
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-supernodes", type=int, default=6)
    p.add_argument("--run-config", default="num-server-rounds=3 fraction-train=0.5 local-steps=10")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--merge", action="store_true", help="keep the other variants already measured (same settings)")
    args = p.parse_args()
    from server.simulation import parse_run_config, simulate

    base = parse_run_config(args.run_config)
    tmp = Path(tempfile.mkdtemp(prefix="fedsb-options-"))
    rows = []
    for name in args.variants.split(","):
        run = simulate(dict(base, **VARIANTS[name], **{"output-dir": str(tmp / name)}), args.num_supernodes)
        s = json.loads((run / "summary.json").read_text())
        recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in recs if r["phase"] == "train"]
        rows.append({"variant": name, "final_accuracy": s["final_accuracy"], "final_loss": s["final_loss"],
                     "bytes_up_per_round": statistics.mean(r["bytes_up"] for r in train),
                     "bytes_down_per_round": statistics.mean(r["bytes_down"] - (r.get("bytes_basis") or 0) for r in train),
                     "train_round_seconds_median": statistics.median(r["seconds"] for r in train),
                     "bytes_basis_total": s["bytes_basis_total"], "bytes_init_total": s["bytes_init_total"]})
        print(json.dumps(rows[-1]), flush=True)
    out = {"what": "options on the default task", "num_supernodes": args.num_supernodes, "run_config": base, "rows": rows}
    if args.merge:
        from bench.common import merge_rows

        out = merge_rows("bench/results/options.json", out, key=lambda r: r["variant"])
        out["rows"].sort(key=lambda r: list(VARIANTS).index(r["variant"]))
    Path("bench/results/options.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
