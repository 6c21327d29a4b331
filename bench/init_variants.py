"""Fed-SB's one-time cost, per initialization variant (issue 14): what a client pays once, how close the
basis is to the dense-gradient one, and held-out accuracy over seeds.

    python -m bench.init_variants bytes       # measured message sizes on the default model -> init_bytes.json
    python -m bench.init_variants overlap     # basis overlap with the dense float32 client basis -> init_overlap.json
    python -m bench.init_variants accuracy --seeds 42 43 44 [--variants dense-f32 sign-int8 server-int8]

Bytes are the serialized Flower contents the apps build (``server.transport.nbytes``), per client: its init
upload and one basis download, against one round's upload. Overlap per layer is ‖B_vᵀ·B_dense‖²_F / r (1:
same subspace; about r/m for a random one), median and min over the adapted layers, for B and A alike.
Accuracy: the default ``make run`` configuration (10 clients, 10 rounds) with the variant's keys, evaluated
on the whole held-out set, one run per seed, saved after every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

from bench.common import machine
from client.handlers import train_reply_content
from fedsb import adapters
from fedsb.adapters.sb_init import SignVote, accumulate_gradients, compute_bases, random_bases
from fedsb.config import FedSBConfig
from fedsb.methods import method_for
from fedsb.wire import encode_basis, flatten, layer_list_fingerprint, pack_signs, round_basis, unpack_signs
from fedsb.tasks import get_task
from server.transport import arrays, nbytes

RESULTS = Path("bench/results")
CLIENTS = 10
VARIANTS = {  # name -> run-config keys on top of the defaults
    "dense-f32": {"init-source": "clients", "init-upload": "dense", "basis-dtype": "float32"},
    "sign-f32": {"init-source": "clients", "init-upload": "sign", "basis-dtype": "float32"},
    "sign-int8": {"init-source": "clients", "init-upload": "sign", "basis-dtype": "int8"},
    "server-int8": {"init-source": "server", "basis-dtype": "int8"},
    "random-int8": {"init-basis": "random", "basis-dtype": "int8"},
    "sign-int4": {"init-source": "clients", "init-upload": "sign", "basis-dtype": "int4"},
    # half the nodes asked for init signs: the one-time upload per client halves on average
    "sign-half-int4": {"init-source": "clients", "init-upload": "sign", "basis-dtype": "int4", "init-fraction": 0.5},
    # issue 20: the same as sign-int8 with the frozen base weights in bfloat16
    "sign-int8-bf16": {"init-source": "clients", "init-upload": "sign", "basis-dtype": "int8", "base-dtype": "bfloat16"},
}


# keys every variant runs with unless it names them: what the defaults were when the first variants ran, so
# a variant means the same run after a default changes
PINNED = {"init-fraction": 1.0}
INIT_FIELDS = ("init_source", "init_upload", "basis_dtype", "init_fraction", "init_basis", "base_dtype")


def variant_config(name: str) -> FedSBConfig:
    return FedSBConfig.from_run_config({**PINNED, **VARIANTS[name]})


def default_variant() -> str | None:
    """The variant that is today's default configuration (its initialization and basis keys), if one is."""
    d = FedSBConfig()
    return next((v for v in VARIANTS if all(getattr(variant_config(v), f) == getattr(d, f) for f in INIT_FIELDS)), None)


def overlap(P: torch.Tensor, Q: torch.Tensor) -> float:
    """‖Pᵀ·Q‖²_F / r for the column spaces of two m×r bases, each made orthonormal first (QR): a quantized
    basis is only nearly orthonormal, and unnormalized columns would push the measure above 1."""
    P, Q = torch.linalg.qr(P.double())[0], torch.linalg.qr(Q.double())[0]
    return float((P.t() @ Q).pow(2).sum() / P.shape[1])


def sign_vote(grads: list, names: list[str]) -> dict[str, torch.Tensor]:
    """The server's weighted majority vote over these clients' packed gradient signs, per layer."""
    vote = {}
    for k in names:
        v = SignVote(grads[0][0][k].numel())
        for g, n in grads:
            v.add(unpack_signs(pack_signs(g[k].numpy().ravel()), g[k].numel()), n)
        vote[k] = torch.from_numpy(v.result().reshape(grads[0][0][k].shape))
    return vote


def client_grads(cfg: FedSBConfig):
    """Each of the 10 default clients' gradient sum over init-samples examples (as the client computes it)."""
    task = get_task(cfg)
    model = task.base_model()
    out = []
    for pid in range(CLIENTS):
        ds = task.data.client_dataset(pid, CLIENTS, cfg)
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + pid * 7919) % (2**31))
        idx = torch.randperm(len(ds), generator=g)[: cfg.init_samples].numpy()
        sums, n = accumulate_gradients(model, task.layer_names, task.loader(ds.subset(idx), shuffle=False), task.loss_fn)
        out.append((sums, n))
    return task, out


def cmd_bytes(args) -> None:
    cfg = FedSBConfig()
    task = get_task(cfg)
    model = task.base_model()
    layers = adapters.inject_sb(model, task.layer_names, cfg.rank)
    shapes = {n: (l.out_features, l.in_features) for n, l in layers.items()}
    total = sum(m * n for m, n in shapes.values())
    vec = method_for(task.cfg).get_vector(model)
    round_up = nbytes(train_reply_content(vec, {"num-examples": 100, "train-loss": 0.5, "seconds": 1.0}, "f" * 32))
    fp = layer_list_fingerprint(shapes)

    def init_reply(key, arr):
        return nbytes(RecordDict({key: arrays(**{key: arr}), "config": ConfigRecord({"layers-fingerprint": fp}),
                                  "metrics": ConfigRecord({"partition-id": 0, "num-train-examples": 1000, "num-examples": 64})}))

    init = {"dense": init_reply("grads", np.zeros(total, np.float32)),
            "sign": init_reply("signs", pack_signs(np.zeros(total, np.float32))), "none": 0}
    bases = random_bases(shapes, cfg.rank, 0)
    basis = {}
    for dtype in ("float32", "bfloat16", "int8", "int4"):
        t = {}
        for n, b in bases.items():
            t[n + ".B"], t[n + ".A"] = round_basis(b.B, dtype), round_basis(b.A, dtype)
        basis[dtype] = nbytes(RecordDict({"basis": arrays(**encode_basis(t, dtype))}))
    basis["seed"] = nbytes(RecordDict({"basis": arrays(basis_seed=np.array([cfg.seed], np.int64))}))
    rows = []
    for name, keys in VARIANTS.items():
        if "base-dtype" in keys:  # the wire is the same as its float32 twin's
            continue
        upload = "none" if keys.get("init-source") == "server" or keys.get("init-basis") == "random" else keys["init-upload"]
        down = basis["seed"] if keys.get("init-basis") == "random" else basis[keys["basis-dtype"]]
        share = variant_config(name).init_fraction  # only the asked nodes upload
        asked = init[upload] + down  # what a node asked for its init signs pays (summary.json's per-client figure)
        mean = init[upload] * share + down
        rows.append({"variant": name, "keys": keys, "init_upload_bytes": init[upload], "init_share": share,
                     "basis_download_bytes": down, "one_time_bytes": asked, "round_upload_bytes": round_up,
                     "rounds_equivalent": asked / round_up, "one_time_bytes_mean": mean,
                     "rounds_equivalent_mean": mean / round_up})
    out = {"what": "one-time bytes by init variant, default model (measured message sizes): for a node asked for "
                   "init signs (one_time_bytes), and the mean over all nodes when only a share is asked",
           "rank": cfg.rank, "adapted_layers": len(shapes), "gradient_entries": total, "rows": rows, "machine": machine()}
    (RESULTS / "init_bytes.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(rows, indent=2))


def cmd_overlap(args) -> None:
    cfg = FedSBConfig()
    task, grads = client_grads(cfg)
    names = task.layer_names
    kw = dict(scale=cfg.scale, update="sign", lr=cfg.init_lr, svd="exact", seed=cfg.seed)
    count = sum(n for _, n in grads)
    dense = compute_bases({k: sum(g[k].double() for g, _ in grads) for k in names}, count, cfg.rank, **kw)
    vote = sign_vote(grads, names)
    server_cfg = FedSBConfig(init_source="server")
    stask = get_task(server_cfg)
    data = stask.server_dataset()
    ssum, sn = accumulate_gradients(stask.base_model(), names, stask.loader(data, shuffle=False), stask.loss_fn)
    shapes = {k: tuple(grads[0][0][k].shape) for k in names}
    three, half = [0, 1, 2], list(range(CLIENTS // 2))
    half_vote = sign_vote([grads[i] for i in half], names)
    variants = {
        "sign vote, 10 clients": compute_bases(vote, count, cfg.rank, **kw),
        f"sign vote, {len(half)} of {CLIENTS} clients": compute_bases(half_vote, sum(grads[i][1] for i in half),
                                                                     cfg.rank, **kw),
        "dense, 3 of 10 clients": compute_bases({k: sum(grads[i][0][k].double() for i in three) for k in names},
                                                sum(grads[i][1] for i in three), cfg.rank, **kw),
        f"server's own {sn} examples": compute_bases({k: v.double() for k, v in ssum.items()}, sn, cfg.rank, **kw),
        "random": random_bases(shapes, cfg.rank, cfg.seed),
    }
    rows = []
    for name, b in variants.items():
        ob = [overlap(b[k].B, dense[k].B) for k in names]
        oa = [overlap(b[k].A.t(), dense[k].A.t()) for k in names]
        rows.append({"variant": name, "overlap_B_median": statistics.median(ob), "overlap_B_min": min(ob),
                     "overlap_A_median": statistics.median(oa), "overlap_A_min": min(oa)})
    for dtype in ("bfloat16", "int8", "int4"):
        ob = [overlap(round_basis(dense[k].B, dtype), dense[k].B) for k in names]
        oa = [overlap(round_basis(dense[k].A, dtype).t(), dense[k].A.t()) for k in names]
        rows.append({"variant": f"dense basis sent as {dtype}", "overlap_B_median": statistics.median(ob),
                     "overlap_B_min": min(ob), "overlap_A_median": statistics.median(oa), "overlap_A_min": min(oa)})
    out = {"what": "basis overlap with the dense float32 10-client basis, default model", "clients": CLIENTS,
           "init_samples": cfg.init_samples, "rank": cfg.rank,
           "random_overlap_B": statistics.median(cfg.rank / m for m, _ in shapes.values()),
           "random_overlap_A": statistics.median(cfg.rank / n for _, n in shapes.values()), "rows": rows,
           "machine": machine()}
    (RESULTS / "init_overlap.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


def cmd_accuracy(args) -> None:
    from server.simulation import simulate

    path = RESULTS / "init_accuracy.json"
    out = json.loads(path.read_text()) if path.exists() else {
        "what": "held-out accuracy by init variant, default run (10 clients, 10 rounds), whole held-out set",
        "base_keys": {"eval-max-samples": 0, "eval-every": 10}, "rows": []}
    for seed in args.seeds:  # seeds outer: a partial sweep still compares every variant
        for variant in args.variants:
            if any(r["variant"] == variant and r["seed"] == seed for r in out["rows"]):
                continue
            keys = {**out["base_keys"], **PINNED, **VARIANTS[variant], "seed": seed,
                    "output-dir": str(Path(args.runs).resolve() / f"{variant}-s{seed}")}
            t0 = time.time()
            s = json.loads((simulate(keys, CLIENTS) / "summary.json").read_text())
            out["rows"].append({"variant": variant, "seed": seed, "accuracy": s["final_accuracy"],
                                "examples": s["config"]["eval-max-samples"], "bytes_init_total": s["bytes_init_total"],
                                "bytes_basis_total": s["bytes_basis_total"],
                                "bytes_one_time_per_client": s["bytes_one_time_per_client"],
                                "bytes_up_per_client_round": s["bytes_up_per_client_round"],
                                "seconds": round(time.time() - t0, 1)})
            out["machine"] = machine()
            path.write_text(json.dumps(out, indent=2))  # after every run: a long sweep can be resumed


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("bytes").set_defaults(func=cmd_bytes)
    sub.add_parser("overlap").set_defaults(func=cmd_overlap)
    a = sub.add_parser("accuracy")
    a.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    a.add_argument("--variants", nargs="+", default=["dense-f32", "sign-int8", "server-int8"], choices=list(VARIANTS))
    a.add_argument("--runs", default="runs/init-variants")
    a.set_defaults(func=cmd_accuracy)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
