"""Half precision on the CPU (issue 20): time per local step and peak memory of a client, per base dtype,
on the default model (rank 32, batch 16, max-length 64), each dtype in a fresh process.

    python -m bench.precision [--steps 8]

Time: median of the measured steps (after 2 warm-up steps), one thread. Memory: the process's resident
high-water mark after the steps (what a client process needs), and the bytes of the model's weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import machine

PROBE = r"""
import json, resource, sys, time, torch
torch.set_num_threads(1)
from fedsb.config import FedSBConfig
from fedsb.methods import method_for
from fedsb.tasks import get_task
from fedsb.tasks.training import train_steps
cfg = FedSBConfig(base_dtype=sys.argv[1])
task = get_task(cfg)
model = task.base_model()
method_for(task.cfg).build(model, task.layer_names)
loader = task.loader(task.data.client_dataset(0, 10, cfg), shuffle=True)
train_steps(model, loader, 2, 1e-3, task.loss_fn, progress=False)
times = []
for _ in range(int(sys.argv[2])):
    t0 = time.perf_counter(); train_steps(model, loader, 1, 1e-3, task.loss_fn, progress=False); times.append(time.perf_counter() - t0)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"step_seconds": times, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "weight_bytes": weights}))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    rows = []
    for dtype in ("float32", "bfloat16"):
        out = subprocess.run([sys.executable, "-c", PROBE, dtype, str(args.steps)], capture_output=True, text=True,
                             check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"base_dtype": dtype, "step_seconds_median": statistics.median(r["step_seconds"]),
                     "peak_rss_bytes": r["peak_rss_bytes"], "weight_bytes": r["weight_bytes"]})
    res = {"what": "client step time and memory by base dtype, default model, CPU", "steps": args.steps, "rows": rows,
           "machine": machine()}
    Path("bench/results/precision.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
