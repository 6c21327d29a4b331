"""Per-round cost of a deployment round (SuperLink + 3 SuperNodes on loopback, TLS + node auth, a new
ClientApp process per message) against a simulation round (Ray actors that keep the model loaded),
same default model and config. Writes bench/results/deploy_overhead.json.

    python -m bench.deploy_overhead [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def _train_seconds(run_dir: Path) -> list[float]:
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["seconds"] for r in recs if r["phase"] == "train"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    from server.simulation import simulate
    from tests.deployment_harness import Federation

    tmp = Path(tempfile.mkdtemp(prefix="fedsb-deploy-bench-"))
    cfg = {"num-server-rounds": args.rounds, "fraction-train": 1.0, "min-available-nodes": 3, "local-steps": 10,
           "eval-max-samples": 200, "round-timeout": 600.0}
    sim_dir = simulate(dict(cfg, **{"output-dir": str(tmp / "sim")}), 3)
    fed = Federation(tmp / "fed", num_nodes=3)
    try:
        fed.start_superlink()
        for i in range(3):
            fed.register(i)
            fed.start_supernode(i)
        t0 = time.time()
        run_id = fed.run(dict(cfg, **{"output-dir": str(tmp / "dep")}))
        status = fed.wait(run_id, timeout=1800)
        wall = time.time() - t0
    finally:
        fed.stop()
    sim, dep = _train_seconds(sim_dir), _train_seconds(tmp / "dep")
    out = {"what": "train-round seconds, default model, 3 clients, 10 local steps each", "status": status,
           "simulation_round_seconds": sim, "deployment_round_seconds": dep,
           "ratio_median": statistics.median(dep) / statistics.median(sim), "deployment_run_wall_seconds": wall,
           "note": "each deployment message starts a fresh ClientApp process: Python + torch import, model load, "
                   "dataset tokenization; the simulation keeps all of it in its Ray actors"}
    Path("bench/results/deploy_overhead.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
