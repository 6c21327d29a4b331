"""Adapter overhead: one training step (forward + backward + AdamW) on the default model with
(a) the frozen base and no adapter (only the head trains), (b) Fed-SB adapters (R + head train),
(c) standard LoRA with about the same number of trainable parameters; Fed-SB's plain module-by-module
path (the one Opacus' hooks need) beside its default one-matmul path. Goal: (b) <= 1.15x (a).

    python -m bench.overhead [--repeats 15] [--batch-size 16] [--seq-len 64] [--rank 32] [--out bench/results/overhead.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from bench.common import interleaved, machine
from fedsb import adapters
from fedsb.methods import make_method
from fedsb.tasks import SeqClsTask
from fedsb.tasks.models import load_base_model
from fedsb.tasks.seq_cls import seq_cls_per_example_loss


def make_step(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (ARGS.batch_size, ARGS.seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (ARGS.batch_size,), generator=g)}
    model.train()

    def step():
        loss = seq_cls_per_example_loss(model, batch).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in params)


def main() -> None:
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--out", default="bench/results/overhead.json")
    ARGS = p.parse_args()
    torch.manual_seed(0)
    path = SeqClsTask.default_model()
    base = load_base_model(path, "seq-cls", 3, 0)
    adapters.freeze_for_adapters(base)  # head only
    sb = load_base_model(path, "seq-cls", 3, 0)
    names = adapters.find_targets(sb, None)
    make_method("fed-sb", ARGS.rank, 1.0, 16.0, 0).build(sb, names)
    # the same adapters on the plain path: a hook on every sb_R is what makes SBLinear call its modules
    # one by one (as under Opacus), instead of the fused W0 + s·B·R·A matmul
    sb_plain = load_base_model(path, "seq-cls", 3, 0)
    make_method("fed-sb", ARGS.rank, 1.0, 16.0, 0).build(sb_plain, names)
    for layer in adapters.adapter_layers(sb_plain).values():
        layer.sb_R.register_forward_hook(lambda mod, inp, out: None)
    # LoRA rank with about the same trainable budget as Fed-SB's r² per layer: r_lora·(m+n) ≈ r²
    mean_mn = sum(sum(adapters.linear_shape(base.get_submodule(n))) for n in names) / len(names)
    lora_r = max(1, round(ARGS.rank**2 / mean_mn))
    lora = load_base_model(path, "seq-cls", 3, 0)
    make_method("fedit", lora_r, 1.0, 16.0, 0).build(lora, names)
    # The fair reference: the frozen base with the backward pass through the whole encoder that any
    # adapter method pays (input activations require grad), but no adapter; "no-adapter" alone stops
    # the backward at the head and so measures backprop, not adapter cost.
    frozen_bw = load_base_model(path, "seq-cls", 3, 0)
    adapters.freeze_for_adapters(frozen_bw)
    frozen_bw.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
    steps = {}
    counts = {}
    for name, m in (("no-adapter", base), ("frozen-backward", frozen_bw), ("fed-sb", sb), ("fed-sb-plain", sb_plain), ("lora", lora)):
        steps[name], counts[name] = make_step(m)
    res = interleaved(steps, ARGS.repeats)
    ref = res["no-adapter"]["median_s"]
    out = {"what": "training step time (fwd+bwd+AdamW), default model", "batch_size": ARGS.batch_size,
           "seq_len": ARGS.seq_len, "fed_sb_rank": ARGS.rank, "lora_rank": lora_r, "machine": machine(),
           "trainable_params": counts, "results": res,
           "ratio_fed_sb_vs_no_adapter": res["fed-sb"]["median_s"] / ref,
           "ratio_lora_vs_no_adapter": res["lora"]["median_s"] / ref,
           "ratio_fed_sb_vs_frozen_backward": res["fed-sb"]["median_s"] / res["frozen-backward"]["median_s"],
           "ratio_lora_vs_frozen_backward": res["lora"]["median_s"] / res["frozen-backward"]["median_s"],
           "ratio_fed_sb_plain_vs_frozen_backward": res["fed-sb-plain"]["median_s"] / res["frozen-backward"]["median_s"],
           "goal": "fed-sb <= 1.15x no-adapter"}
    Path(ARGS.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
