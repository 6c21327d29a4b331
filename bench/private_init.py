"""How much of Fed-SB's basis survives a private initialization: the subspaces spanned by B and A from the
noised init gradient against those from the same clipped gradient without noise, on the default model and
data, at the noise multipliers the private comparison calibrated (read from its results file).

Per layer, overlap(B) = ‖B_privᵀ·B_cleanᵀ‖²_F / r: 1 when the subspaces agree, about r/m for a random
subspace (the reference column). The server's view is simulated exactly: every client's clipped per-example
gradients are summed over its init sample, and the sum of the clients' independent N(0, σ²C²) noises is one
N(0, k·σ²C²) draw for k clients.

    python -m bench.private_init [--clients 6] [--init-samples 64] [--results bench/results/private_compare_long.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench.common import machine
from fedsb.privacy import dp as privacy
from fedsb.config import FedSBConfig
from fedsb.adapters.sb_init import compute_bases
from fedsb.tasks import get_task


def overlap(P: torch.Tensor, Q: torch.Tensor) -> float:
    """‖Pᵀ·Q‖²_F / r for two orthonormal m×r bases."""
    return float((P.t().double() @ Q.double()).pow(2).sum() / P.shape[1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--init-samples", type=int, default=64)
    p.add_argument("--results", default="bench/results/private_compare_long.json")
    p.add_argument("--out", default="bench/results/private_init.json")
    args = p.parse_args()
    rows = json.loads(Path(args.results).read_text())["rows"]
    sigmas = {r["target_epsilon"]: r["noise_multiplier"] for r in rows if r["method"] == "fed-sb"}
    cfg = FedSBConfig.from_run_config({"init-samples": args.init_samples})
    task = get_task(cfg)
    model = task.base_model()
    C = cfg.max_grad_norm
    total, count = None, 0
    g = torch.Generator().manual_seed(0)
    for pid in range(args.clients):
        ds = task.data.client_dataset(pid, args.clients, cfg)
        idx = torch.randperm(len(ds), generator=g)[: args.init_samples].numpy()
        sums, n = privacy.private_gradient_sum(model, task.layer_names, task.loader(ds.subset(idx), shuffle=False),
                                               max_grad_norm=C, noise_multiplier=0.0, loss_fn=task.loss_fn, generator=g)
        total = sums if total is None else {k: total[k] + v for k, v in sums.items()}
        count += n
    kw = dict(scale=cfg.scale, update=cfg.init_update, lr=cfg.init_lr, svd=cfg.init_svd, seed=cfg.seed)
    clean = compute_bases(total, count, cfg.rank, **kw)
    signal = float(torch.sqrt(sum(v.double().pow(2).sum() for v in total.values())))
    numbers = sum(v.numel() for v in total.values())
    out_rows = []
    for eps, sigma in sorted(sigmas.items()):
        std = sigma * C * args.clients ** 0.5
        noisy = {k: v + torch.normal(0.0, std, size=v.shape, generator=g) for k, v in total.items()}
        priv = compute_bases(noisy, count, cfg.rank, **kw)
        ob = [overlap(priv[k].B, clean[k].B) for k in total]
        oa = [overlap(priv[k].A.t(), clean[k].A.t()) for k in total]
        out_rows.append({"target_epsilon": eps, "noise_multiplier": sigma, "noise_norm_expected": std * numbers ** 0.5,
                         "overlap_B_median": statistics.median(ob), "overlap_A_median": statistics.median(oa),
                         "overlap_B_max": max(ob), "overlap_A_max": max(oa)})
        print(json.dumps(out_rows[-1]), flush=True)
    random_b = statistics.median(cfg.rank / v.shape[0] for v in total.values())  # E overlap of a random m×r basis
    random_a = statistics.median(cfg.rank / v.shape[1] for v in total.values())
    out = {"what": "private vs clean init basis overlap, default model", "clients": args.clients,
           "init_samples": args.init_samples, "rank": cfg.rank, "layers": len(total), "numbers": numbers,
           "clipped_signal_norm": signal, "random_overlap_B": random_b,
           "random_overlap_A": random_a, "machine": machine(), "rows": out_rows}
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
