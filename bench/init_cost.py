"""Initialization cost on the default model: gradient accumulation over init-samples + truncated SVD of
every adapted layer, against one local training step (goal: init <= 2 steps); randomized vs exact SVD
time and error on the same update matrices.

    python -m bench.init_cost [--init-samples 64,16] [--rank 32] [--repeats 5] [--out bench/results/init_cost.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.common import interleaved, machine
from bench.overhead import make_step
from fedsb import adapters
from fedsb.adapters.sb_init import accumulate_gradients, compute_bases, truncated_svd
from fedsb.methods import make_method
from fedsb.tasks import SeqClsTask
from fedsb.tasks.models import load_base_model
from fedsb.tasks.seq_cls import seq_cls_per_example_loss
import bench.overhead as ov


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--init-samples", default="64,16", help="comma-separated: the gradient pass is timed for each")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench/results/init_cost.json")
    args = p.parse_args()
    counts = [int(c) for c in args.init_samples.split(",")]
    ov.ARGS = args
    path = SeqClsTask.default_model()
    model = load_base_model(path, "seq-cls", 3, 0)
    names = adapters.find_targets(model, None)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(max(1, max(counts) // args.batch_size)):
        ids = torch.randint(1000, 20000, (args.batch_size, args.seq_len), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "labels": torch.randint(0, 3, (args.batch_size,), generator=g)})
    grads = {}

    def grad_pass(k: int):
        # the first k examples, in batches of batch-size (as the client's loader gives them)
        sub = [{key: v[: k - i * args.batch_size] for key, v in b.items()}
               for i, b in enumerate(batches) if i * args.batch_size < k]
        grads["g"], grads["n"] = accumulate_gradients(model, names, sub, seq_cls_per_example_loss)

    grad_pass(counts[0])

    def svd_exact():
        compute_bases(grads["g"], grads["n"], args.rank, svd="exact")

    def svd_randomized():
        compute_bases(grads["g"], grads["n"], args.rank, svd="randomized")

    sb = load_base_model(path, "seq-cls", 3, 0)
    make_method("fed-sb", args.rank, 1.0, 16.0, 0).build(sb, names)
    step, _ = make_step(sb)
    fns = {f"gradient_accumulation_{k}": (lambda k=k: grad_pass(k)) for k in counts}
    fns.update({"svd_exact_all_layers": svd_exact, "svd_randomized_all_layers": svd_randomized, "train_step": step})
    res = interleaved(fns, args.repeats, warmup=1)
    grad_pass(counts[0])  # the error check below uses the gradient of the first count
    # accuracy of the randomized SVD: relative excess error over the optimal (exact) rank-r error
    errs = []
    for n, G in grads["g"].items():
        dW = -torch.sign(G.double())
        tail = torch.linalg.svdvals(dW)[args.rank:].norm()
        U, S, Vh = truncated_svd(dW, args.rank, "randomized")
        errs.append(float((dW - U @ torch.diag(S) @ Vh).norm() / tail - 1))
    step_s = res["train_step"]["median_s"]
    in_steps = {k: {"exact": (res[f"gradient_accumulation_{k}"]["median_s"] + res["svd_exact_all_layers"]["median_s"]) / step_s,
                    "randomized": (res[f"gradient_accumulation_{k}"]["median_s"] + res["svd_randomized_all_layers"]["median_s"]) / step_s}
                for k in counts}
    out = {"what": "init cost vs a training step, default model", "init_samples": counts, "batch_size": args.batch_size,
           "rank": args.rank, "layers": len(names), "machine": machine(), "results": res,
           "init_in_train_steps": in_steps,
           "randomized_svd_excess_error_median": statistics.median(errs), "randomized_svd_excess_error_max": max(errs),
           "goal": "init <= 2 training steps"}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
