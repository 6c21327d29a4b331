"""Per-round cost of a deployment round (SuperLink + 3 SuperNodes on loopback, TLS + node auth, a new
ClientApp process per message) against a simulation round (Ray actors that keep the model loaded),
same default model and config, and where a client's time goes (median over replies, from the
``client_seconds`` of metrics.jsonl): before (``FEDSB_DATA_CACHE=0``: every process tokenizes and
partitions) and after (the on-disk data cache, warm from the run's first message on).

    python -m bench.deploy_overhead [--rounds 3]

Writes bench/results/deploy_overhead.json. The first train round also pays for the init query and a
cold cache, so the ratio uses rounds 2 and later.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import machine


def _train_rows(run_dir: Path) -> list[dict]:
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["phase"] == "train"]


def _breakdown(rows: list[dict]) -> dict:
    later = rows[1:] or rows
    parts = {k for r in later for k in (r.get("client_seconds") or {})}
    return {"round_seconds": [r["seconds"] for r in rows], "round_seconds_median_later": statistics.median(r["seconds"] for r in later),
            "client_seconds_median_later": {k: statistics.median(r["client_seconds"][k] for r in later if r.get("client_seconds"))
                                            for k in sorted(parts)}}


def deployment(tmp: Path, name: str, cfg: dict, cache: bool) -> dict:
    from tests.deployment_harness import Federation

    os.environ["FEDSB_DATA_CACHE"] = "1" if cache else "0"  # inherited by every process the harness starts
    fed = Federation(tmp / name, num_nodes=3)
    try:
        fed.start_superlink()
        for i in range(3):
            fed.register(i)
            fed.start_supernode(i)
        t0 = time.time()
        run_id = fed.run(dict(cfg, **{"output-dir": str(tmp / name / "run")}))
        status = fed.wait(run_id, timeout=1800)
        wall = time.time() - t0
    finally:
        fed.stop()
        os.environ.pop("FEDSB_DATA_CACHE", None)
    return {"status": status, "wall_seconds": wall, **_breakdown(_train_rows(tmp / name / "run"))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    from server.simulation import simulate

    tmp = Path(tempfile.mkdtemp(prefix="fedsb-deploy-bench-"))
    cfg = {"num-server-rounds": args.rounds, "fraction-train": 1.0, "min-available-nodes": 3, "local-steps": 10,
           "eval-max-samples": 200, "round-timeout": 600.0}
    sim = _breakdown(_train_rows(simulate(dict(cfg, **{"output-dir": str(tmp / "sim")}), 3)))
    before = deployment(tmp, "no-cache", cfg, cache=False)
    after = deployment(tmp, "cache", cfg, cache=True)
    out = {"what": "train-round seconds, default model, 3 clients, 10 local steps each; client_seconds: median over "
                   "replies of process age at the handler, setup (config + task load), model (+ basis), data "
                   "(partition), seconds (local training)",
           "command": f"python -m bench.deploy_overhead --rounds {args.rounds}", "simulation": sim,
           "deployment_before": before, "deployment_after": after,
           "ratio_before": before["round_seconds_median_later"] / sim["round_seconds_median_later"],
           "ratio_after": after["round_seconds_median_later"] / sim["round_seconds_median_later"], "machine": machine()}
    Path("bench/results/deploy_overhead.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
