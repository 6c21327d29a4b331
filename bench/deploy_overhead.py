"""Per-round cost of a deployment round (SuperLink + 3 SuperNodes on loopback, TLS + node auth, a new
ClientApp process per message) against a simulation round (Ray actors that keep the model loaded),
same default model and config, and where a client's time goes (median over replies, from the
``client_seconds`` of metrics.jsonl): before (``FEDSB_DATA_CACHE=0``: every process tokenizes and
partitions), after (the on-disk data cache, warm from the run's first message on), and with warm start
(each ClientApp process forked from a node's process that has imported torch and transformers once,
client/warm_start.py); and the same run in
containers (``docker/compose.yml`` + ``compose.tls.yml``: SuperLink, 3 SuperNodes and their executors, the
images built here by lab/docker_harness.py; needs root).

    python -m bench.deploy_overhead [--rounds 3] [--parts before,after,warm,containers]

Each part is measured beside a simulation run in the same invocation (its ratio is to that one), and is
merged into bench/results/deploy_overhead.json without dropping the parts not measured this time. The
first train round also pays for the init query and a cold cache, so the ratio uses rounds 2 and later.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def deployment(tmp: Path, name: str, cfg: dict, cache: bool, warm: bool = False) -> dict:
    from lab.deployment_harness import Federation

    os.environ["FEDSB_DATA_CACHE"] = "1" if cache else "0"  # inherited by every process the harness starts
    fed = Federation(tmp / name, num_nodes=3, warm=warm)
    try:
        fed.start_superlink()
        for i in range(3):
            fed.register(i)
            fed.start_supernode(i)
        t0 = time.time()
        run_id = fed.start_run(dict(cfg, **{"output-dir": str(tmp / name / "run")}))
        status = fed.wait(run_id, timeout=1800)
        wall = time.time() - t0
    finally:
        fed.stop()
        os.environ.pop("FEDSB_DATA_CACHE", None)
    return {"status": status, "wall_seconds": wall, **_breakdown(_train_rows(tmp / name / "run"))}


def containers(cfg: dict) -> dict:
    """The same run on the committed compose files with TLS and node authentication, in containers."""
    from lab.docker_harness import ComposeFederation, build_images, ensure_engine

    ensure_engine()
    build_images()  # cached: a no-op when the images are current
    work, run_dir = Path(tempfile.mkdtemp(prefix="fedsb-deploy-bench-docker-")), "/app/runs/deploy-bench"
    # The simulation beside it leaves this process's PYTHONPATH pointing into the venv (Ray does), and Debian's
    # docker-compose (the system Python) would then import the venv's requests and fail: compose gets none.
    pythonpath = os.environ.pop("PYTHONPATH", None)
    try:
        fed = ComposeFederation(work / "project")
    finally:
        if pythonpath is not None:
            os.environ["PYTHONPATH"] = pythonpath
    try:
        fed.make_certs()
        fed.start_superlink()
        for i in range(fed.num_nodes):
            if (res := fed.register(i)).returncode != 0:
                raise RuntimeError(f"registering supernode {i}: {res.stdout}{res.stderr}")
        fed.up()
        t0 = time.time()
        run_id = fed.start_run(dict(cfg, **{"output-dir": run_dir}))
        while not (status := fed.status(run_id)).startswith("finished"):
            if time.time() - t0 > 1800:
                raise RuntimeError(f"run {run_id} still {status!r} after 30 min")
            time.sleep(5)
        wall, rows = time.time() - t0, [r for r in fed.records(run_dir) if r["phase"] == "train"]
    finally:
        fed.down()
        shutil.rmtree(work, ignore_errors=True)
    return {"status": status, "wall_seconds": wall, **_breakdown(rows)}


PARTS = {"before": "deployment_before", "after": "deployment_after", "warm": "deployment_warm", "containers": "containers"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--parts", default="before,after",
                   help="deployments to measure beside a simulation: before (loopback, no data cache), after "
                        "(loopback, data cache), warm (after + warm start: client/warm_start.py), containers "
                        "(docker-compose; needs root)")
    args = p.parse_args()
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if bad := [x for x in parts if x not in PARTS]:
        raise SystemExit(f"--parts: {bad} not among {list(PARTS)}")
    from server.simulation import simulate

    # The 1/5/15-min load averages before anything starts: what "an idle machine" means, measured not claimed.
    load_at_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="fedsb-deploy-bench-"))
    cfg = {"num-server-rounds": args.rounds, "fraction-train": 1.0, "min-available-nodes": 3, "local-steps": 10,
           "eval-max-samples": 200, "round-timeout": 600.0}
    sim = _breakdown(_train_rows(simulate(dict(cfg, **{"output-dir": str(tmp / "sim")}), 3)))
    path = Path("bench/results/deploy_overhead.json")
    out = json.loads(path.read_text()) if path.exists() else {}
    command = f"python -m bench.deploy_overhead --rounds {args.rounds} --parts {','.join(parts)}"
    for part in parts:
        d = containers(cfg) if part == "containers" else deployment(tmp, part, cfg, cache=part != "before", warm=part == "warm")
        out[PARTS[part]] = {**d, "command": command, "simulation": sim, "machine": machine(),
                            "load_at_start": load_at_start,
                            "ratio": d["round_seconds_median_later"] / sim["round_seconds_median_later"]}
        path.write_text(json.dumps(out, indent=1))  # after each part: a later failure keeps what finished
    out["what"] = ("train-round seconds, default model, 3 clients, 10 local steps each; client_seconds: median over "
                   "replies of process age at the handler, setup (config + task load), model (+ basis), data "
                   "(partition), seconds (local training); each deployment's ratio is to the simulation beside it")
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
