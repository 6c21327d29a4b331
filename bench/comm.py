"""Wire bytes per client per round vs the raw floor, per method, on the default model (MiniLM, 3 labels).

Measured from the serialized Flower message contents the client and server actually build (the same
functions the apps use), not computed from shapes. Also: the one-time costs (basis broadcast, init
gradient upload), measured here and extrapolated by formula to larger models at the paper's ranks.

    python -m bench.comm [--rank 32] [--lora-rank 8] [--clients 4]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from flwr.app import RecordDict

from client.handlers import train_reply_content
from fedsb import adapters
from fedsb.config import FedSBConfig
from fedsb.run.export import head_state
from fedsb.methods import make_method
from fedsb.upload import quantize_update, rounding_generator
from fedsb.wire import flatten
from fedsb.tasks import SeqClsTask
from fedsb.tasks.models import load_base_model
from server.transport import arrays, nbytes

# Public architecture dimensions (hidden, intermediate, layers, q heads, kv heads, head dim) of models the
# Fed-SB paper fine-tunes; the byte formula needs only the shapes of the 7 projections per block.
ARCH = {
    "Llama-3.2-3B": dict(hidden=3072, inter=8192, layers=28, kv=8 * 128, rank=120),
    "Mistral-7B": dict(hidden=4096, inter=14336, layers=32, kv=8 * 128, rank=200),
    "Gemma-2-9B": dict(hidden=3584, inter=14336, layers=42, kv=8 * 256, q=16 * 256, rank=200),
}


def llama_shapes(a: dict) -> list[tuple[int, int]]:
    h, q = a["hidden"], a.get("q", a["hidden"])
    per = [(q, h), (a["kv"], h), (a["kv"], h), (h, q), (a["inter"], h), (a["inter"], h), (h, a["inter"])]
    return per * a["layers"]


def one_time_bytes(shapes: list[tuple[int, int]], rank: int, dtype_bytes: int = 4) -> dict[str, int]:
    """Basis B (m×r) + A (r×n) per layer; init gradient m×n per layer (float32)."""
    return {"basis": sum(dtype_bytes * rank * (m + n) for m, n in shapes), "init_gradient": sum(4 * m * n for m, n in shapes)}


def measure(rank: int, lora_rank: int, clients: int) -> dict:
    path = SeqClsTask.default_model()
    out = {"model": "all-MiniLM-L6-v2 (default)", "rows": []}
    for name in ("fed-sb", "fedit", "ffa-lora", "fedex-lora", "flora"):
        r = rank if name == "fed-sb" else lora_rank
        model = load_base_model(path, "seq-cls", 3, 0)
        names = adapters.find_targets(model, None)
        method = make_method(name, r, 1.0, 16.0, 0)
        layers = method.build(model, names)
        vec = method.get_vector(model)
        up = nbytes(train_reply_content(vec, {"num-examples": 100, "train-loss": 0.5, "seconds": 1.0}, "f" * 32))
        down_rd = RecordDict({"adapter": arrays(adapter=vec)})
        shapes = [(l.out_features, l.in_features) for l in layers.values()]
        head = sum(t.numel() for t in head_state(model).values())
        if name == "fedex-lora":  # the cumulative residual, m·n per layer, every round
            down_rd["extra"] = arrays(residual=np.zeros(sum(m * n for m, n in shapes), np.float32))
        if name == "flora":  # one round's stack of `clients` clients
            down_rd["extra"] = arrays(**{"stack-0": np.zeros(sum(clients * r * (m + n) for m, n in shapes), np.float32)})
        down = nbytes(down_rd)
        floor_up = 4 * vec.size
        row = {"method": name, "rank": r, "layers": len(shapes), "head_params": head, "numbers_up": int(vec.size),
               "floor_up_bytes": floor_up, "measured_up_bytes": up, "ratio_up": round(up / floor_up, 4),
               "measured_down_bytes": down}
        # upload-dtype int8/int4: the client's update (here a random one: the codes' size does not depend on it)
        # quantized as the ClientApp does, a segment per trainable tensor, in the reply it builds
        segments = [t.numel() for t in method.trainable(model).values()]
        update = np.random.default_rng(0).normal(0, 1e-3, vec.size).astype(np.float32)
        for dtype in ("int8", "int4"):
            q = quantize_update(update, segments, dtype, rounding_generator(np.random.SeedSequence(0)))
            qb = nbytes(train_reply_content(q, {"num-examples": 100, "train-loss": 0.5, "seconds": 1.0}, "f" * 32))
            row[f"measured_up_{dtype}_bytes"], row[f"ratio_up_{dtype}"] = qb, round(qb / floor_up, 4)
        if name == "fed-sb":
            ot = one_time_bytes(shapes, r)
            basis_vec = flatten({k: v for n, l in layers.items() for k, v in ((n + ".B", l.sb_B), (n + ".A", l.sb_A))})
            row["basis_measured_bytes"] = nbytes(RecordDict({"basis": arrays(basis=basis_vec)}))
            bits = torch.from_numpy(basis_vec).bfloat16().view(torch.uint16).numpy()
            row["basis_bf16_measured_bytes"] = nbytes(RecordDict({"basis": arrays(basis_bf16=bits)}))
            row["basis_formula_bytes"] = ot["basis"]
            grads = np.zeros(sum(m * n for m, n in shapes), np.float32)
            row["init_gradient_measured_bytes"] = nbytes(RecordDict({"grads": arrays(grads=grads)}))
            row["init_gradient_formula_bytes"] = ot["init_gradient"]
        out["rows"].append(row)
    out["extrapolated"] = {}
    for arch, a in ARCH.items():
        shapes = llama_shapes(a)
        ot = one_time_bytes(shapes, a["rank"])
        out["extrapolated"][arch] = {"rank": a["rank"], "layers": len(shapes),
                                     "fed_sb_up_per_round_bytes": 4 * a["rank"] ** 2 * len(shapes),
                                     "basis_bytes_float32": ot["basis"], "basis_bytes_bfloat16": ot["basis"] // 2,
                                     "init_gradient_bytes": ot["init_gradient"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=FedSBConfig().rank)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--clients", type=int, default=4)
    args = p.parse_args()
    print(json.dumps(measure(args.rank, args.lora_rank, args.clients), indent=1))


if __name__ == "__main__":
    main()
