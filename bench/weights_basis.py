"""How often ``init-basis=weights`` disagrees across machines (issue 31): the basis each party computes from
its own copy of the default model, fingerprinted per layer, for every rank and basis dtype measured.

    python -m bench.weights_basis --out agree-HOST.json          # on each machine
    python -m bench.weights_basis --compare a.json b.json        # the layers and whole bases that differ
    python -m bench.weights_basis --from-runs runs/frontier-*    # what the runs themselves saw (below)

``--from-runs`` reads every finished run with a weights basis: each summary.json holds the basis fingerprint
the server computed, the share of nodes that fell back to receiving the matrices (``basis_fallback_rate``)
and the versions it ran with. Runs of one (basis, rank, basis dtype) made on different machines agree across
machines exactly when their fingerprints are equal. Written to bench/results/weights_basis.json.

A node whose whole-basis fingerprint differs from the server's is sent the matrices instead (the fallback),
so the share of (rank, dtype, directions) cases whose fingerprints differ is the fallback rate between
those two machines; the per-layer count says how close they came. Each record also names the machine
(torch, its BLAS/LAPACK build, the CPU) so the comparison says what differed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
from pathlib import Path

RANKS = (16, 32, 64)
DTYPES = ("int4", "int8", "bfloat16", "float32")
DIRECTIONS = ("weights", "weights-minor")


def measure() -> dict:
    import torch

    from fedsb.adapters.sb_init import weight_bases
    from fedsb.config import FedSBConfig
    from fedsb.adapters.layers import weight_as_mn
    from fedsb.methods.fed_sb import WEIGHT_BASES
    from fedsb.tasks import get_task
    from fedsb.wire import basis_fingerprint, round_basis

    task = get_task(FedSBConfig.from_run_config({"device": "cpu"}))
    model = task.base_model()
    weights = {n: weight_as_mn(model.get_submodule(n)) for n in task.layer_names}
    cases = {}
    for directions in DIRECTIONS:
        for rank in RANKS:
            bases = weight_bases(weights, rank, WEIGHT_BASES[directions])
            for dtype in DTYPES:
                rounded = {n: (round_basis(b.B, dtype), round_basis(b.A, dtype)) for n, b in bases.items()}
                layers = {n: hashlib.sha256(B.numpy().tobytes() + A.numpy().tobytes()).hexdigest()[:16]
                          for n, (B, A) in rounded.items()}
                cases[f"{directions}/r{rank}/{dtype}"] = {
                    "fingerprint": basis_fingerprint(task.model_id, rank, rounded), "layers": layers}
    return {"machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()
                        or platform.machine(), "blas": torch.__config__.show().splitlines()[:12]},
            "model_id": task.model_id, "cases": cases}


def compare(a: dict, b: dict) -> dict:
    differ = {k: sum(a["cases"][k]["layers"][n] != b["cases"][k]["layers"][n] for n in a["cases"][k]["layers"])
              for k in a["cases"] if a["cases"][k]["fingerprint"] != b["cases"][k]["fingerprint"]}
    return {"model_id_equal": a["model_id"] == b["model_id"], "cases": len(a["cases"]), "fallback_cases": len(differ),
            "fallback_rate": len(differ) / len(a["cases"]), "layers": len(next(iter(a["cases"].values()))["layers"]),
            "layers_differing": differ}


def from_runs(dirs: list[str]) -> dict:
    groups: dict[str, dict] = {}
    for d in dirs:
        for f in sorted(Path(d).glob("**/summary.json")):
            s = json.loads(f.read_text())
            c = s["config"]
            if c.get("init-basis") not in DIRECTIONS or s.get("fingerprint") is None:
                continue
            key = f"{c['init-basis']}/r{c['rank']}/{c['basis-dtype']}"
            machine = f"torch {s['versions']['torch']}, python {s['versions']['python']}"
            g = groups.setdefault(key, {"fingerprints": {}, "runs": 0, "nodes": 0, "fallback_nodes": 0})
            g["fingerprints"].setdefault(machine, set()).add(s["fingerprint"])
            g["runs"] += 1
            g["nodes"] += len(s.get("node_train_examples") or [])
            g["fallback_nodes"] += int(s.get("basis_fallback_nodes") or 0)
    out = {}
    for key, g in sorted(groups.items()):
        prints = {m: sorted(v) for m, v in g["fingerprints"].items()}
        distinct = {p for v in prints.values() for p in v}
        out[key] = {"runs": g["runs"], "nodes_in_runs": g["nodes"], "fallback_nodes": g["fallback_nodes"],
                    "machines": sorted(prints), "fingerprints": prints, "distinct_fingerprints": len(distinct),
                    # None: one machine only, nothing to say across machines
                    "agree_across_machines": (len(distinct) == 1) if len(prints) > 1 else None}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="")
    p.add_argument("--compare", nargs=2, default=None)
    p.add_argument("--from-runs", nargs="+", default=None)
    args = p.parse_args()
    if args.from_runs:
        result = from_runs(args.from_runs)
        Path("bench/results/weights_basis.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return
    if args.compare:
        a, b = (json.loads(Path(f).read_text()) for f in args.compare)
        print(json.dumps(compare(a, b), indent=1))
        return
    result = measure()
    text = json.dumps(result, indent=1)
    Path(args.out).write_text(text) if args.out else print(text)


if __name__ == "__main__":
    main()
