"""DP overhead: 10 DP-SGD steps (Opacus per-sample gradients of R and head, clipping, noise, accountant)
against 10 plain steps, on the default model with Fed-SB adapters, per grad-sample mode. Goal <= 1.3x.

The DP steps use Poisson rate 1 (batch = the whole 16-example set) so both paths see the same batch size.

    python -m bench.dp_overhead [--repeats 5] [--modes hooks,functorch] [--out bench/results/dp_overhead.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.common import interleaved, machine
from fedsb import adapters
from fedsb.privacy import dp as privacy
from fedsb.tasks.data import pad_collate
from fedsb.methods import make_method
from fedsb.tasks import SeqClsTask
from fedsb.tasks.models import load_base_model
from fedsb.tasks.seq_cls import seq_cls_per_example_loss
from fedsb.tasks.training import train_steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--modes", default="hooks,functorch")
    p.add_argument("--out", default="bench/results/dp_overhead.json")
    args = p.parse_args()
    path = SeqClsTask.default_model()
    model = load_base_model(path, "seq-cls", 3, 0)
    make_method("fed-sb", args.rank, 1.0, 16.0, 0).build(model, adapters.find_targets(model, None))
    g = torch.Generator().manual_seed(0)
    ds = [{"input_ids": (ids := torch.randint(1000, 20000, (args.seq_len,), generator=g)),
           "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (), generator=g)}
          for _ in range(args.batch_size)]
    collate = pad_collate(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, collate_fn=collate)
    fns = {"plain": lambda: train_steps(model, loader, args.steps, 1e-3, seq_cls_per_example_loss, progress=False)}
    for mode in args.modes.split(","):
        fns[f"dp-{mode}"] = (lambda m=mode: privacy.private_train(
            model, ds, collate, steps=args.steps, batch_size=args.batch_size, lr=1e-3, weight_decay=0.0,
            noise_multiplier=1.0, max_grad_norm=1.0, history=[], accountant="rdp", grad_sample_mode=m,
            loss_fn=seq_cls_per_example_loss, delta=1e-5))
    res = interleaved(fns, args.repeats, warmup=1)
    ref = res["plain"]["median_s"]
    out = {"what": f"{args.steps} training steps, DP-SGD vs plain, Fed-SB r={args.rank} on the default model",
           "batch_size": args.batch_size, "seq_len": args.seq_len, "machine": machine(), "results": res,
           "ratios": {k: v["median_s"] / ref for k, v in res.items()}, "goal": "dp <= 1.3x plain"}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
