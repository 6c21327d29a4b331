"""Initialization cost on the default model: gradient accumulation over init-samples + truncated SVD of
every adapted layer, against one local training step (goal: init <= 2 steps); randomized vs exact SVD
time and error on the same update matrices.

    python -m bench.init_cost [--init-samples 64] [--rank 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.common import interleaved, machine
from bench.overhead import make_step
from fedsb import adapters
from fedsb.init import accumulate_gradients, compute_bases, truncated_svd
from fedsb.methods import make_method
from fedsb.models import load_base_model, resolve_model_path
from fedsb.training import seq_cls_per_example_loss
import bench.overhead as ov


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--init-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    ov.ARGS = args
    path = resolve_model_path("default")
    model = load_base_model(path, "seq-cls", 3, 0)
    names = adapters.find_targets(model, None)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(max(1, args.init_samples // args.batch_size)):
        ids = torch.randint(1000, 20000, (args.batch_size, args.seq_len), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "labels": torch.randint(0, 3, (args.batch_size,), generator=g)})
    grads = {}

    def grad_pass():
        grads["g"], grads["n"] = accumulate_gradients(model, names, batches, seq_cls_per_example_loss)

    grad_pass()

    def svd_exact():
        compute_bases(grads["g"], grads["n"], args.rank, svd="exact")

    def svd_randomized():
        compute_bases(grads["g"], grads["n"], args.rank, svd="randomized")

    sb = load_base_model(path, "seq-cls", 3, 0)
    make_method("fed-sb", args.rank, 1.0, 16.0, 0).build(sb, names)
    step, _ = make_step(sb)
    res = interleaved({"gradient_accumulation": grad_pass, "svd_exact_all_layers": svd_exact,
                       "svd_randomized_all_layers": svd_randomized, "train_step": step}, args.repeats, warmup=1)
    # accuracy of the randomized SVD: relative excess error over the optimal (exact) rank-r error
    errs = []
    for n, G in grads["g"].items():
        dW = -torch.sign(G.double())
        tail = torch.linalg.svdvals(dW)[args.rank:].norm()
        U, S, Vh = truncated_svd(dW, args.rank, "randomized")
        errs.append(float((dW - U @ torch.diag(S) @ Vh).norm() / tail - 1))
    init_total = res["gradient_accumulation"]["median_s"] + res["svd_exact_all_layers"]["median_s"]
    out = {"what": "init cost vs a training step, default model", "init_samples": args.init_samples,
           "rank": args.rank, "layers": len(names), "machine": machine(), "results": res,
           "init_exact_in_train_steps": init_total / res["train_step"]["median_s"],
           "init_randomized_in_train_steps": (res["gradient_accumulation"]["median_s"] + res["svd_randomized_all_layers"]["median_s"]) / res["train_step"]["median_s"],
           "randomized_svd_excess_error_median": statistics.median(errs), "randomized_svd_excess_error_max": max(errs),
           "goal": "init <= 2 training steps"}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
