"""Recover a benchmark's result file from the rows it printed, when the run was stopped before its end.

    python -m bench.from_log options LOG [--missing "..."]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

META = {
    "options": {"what": "options on the default task", "num_supernodes": 6,
                "run_config": {"num-server-rounds": 2, "fraction-train": 0.5, "local-steps": 10}},
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("bench", choices=sorted(META))
    p.add_argument("log")
    p.add_argument("--missing", default="")
    args = p.parse_args()
    rows = [json.loads(l) for l in open(args.log, errors="replace") if l.startswith("{\"")]
    out = dict(META[args.bench], rows=rows)
    if args.missing:
        out["partial"] = args.missing
    Path(f"bench/results/{args.bench}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
