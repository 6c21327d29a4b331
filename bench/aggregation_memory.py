"""Aggregation memory vs the number of clients, the server's own part alone (no Flower runtime, no link state).

``bench.scale`` measures the whole simulated server process, in which Flower's in-memory link state holds
every message of a round; this isolates what fedsb's server does with the replies: each reply vector (the
size of the default model's Fed-SB or FedIT upload) arrives one at a time, is validated with
``fedsb.aggregation.validation.check_reply`` and folded into ``fedsb.aggregation.robust.BlockWeightedMean`` (the streaming
path of ``server/rounds.py``), then let go. Beside it, the hold-every-vector path that FedEx-LoRA, FLoRA and the robust
rules (median, trimmed mean: Flower's ``FedMedian``/``FedTrimmedAvg``, via ``server/robust.py``) need. Peak allocation by tracemalloc (numpy buffers are traced).
Goal: the streaming peak does not grow with the number of clients.

    python -m bench.aggregation_memory [--clients 10,100,1000,10000] [--out bench/results/aggregation_memory.json]
"""

from __future__ import annotations

import argparse
import json
import tracemalloc
from pathlib import Path

import numpy as np

from bench.common import machine
from client.flower_private import SUPERLINK_NODE_ID, TaskIdentity
from fedsb import adapters
from fedsb.aggregation import robust
from fedsb.methods import make_method
from fedsb.tasks import SeqClsTask
from fedsb.tasks.models import load_base_model
from fedsb.aggregation.validation import ReplySpec, check_reply
from server.robust import robust_combine


def upload_sizes() -> dict[str, int]:
    """Numbers per upload on the default model: Fed-SB r=32, FedIT r=24 (the comparison's ranks)."""
    path = SeqClsTask.default_model()
    out = {}
    for method, rank in (("fed-sb", 32), ("fedit", 24)):
        model = load_base_model(path, "seq-cls", 3, 0)
        m = make_method(method, rank, 1.0, 16.0, 0)
        m.build(model, adapters.find_targets(model, None))
        out[method] = int(m.get_vector(model).size)
    return out


def peak_bytes(size: int, clients: int, streaming: bool) -> int:
    spec = ReplySpec(shapes={"adapter": (size,)})
    rng = np.random.default_rng(0)
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    # the accumulator only on the streaming path: the hold-all path never builds one
    running, held, weights = robust.BlockWeightedMean(np.zeros(size, np.float32)) if streaming else None, [], []
    for _ in range(clients):
        vec = rng.standard_normal(size, dtype=np.float32)  # one reply, as pulled off the link
        n_ex = check_reply(spec, {"adapter": vec}, 100, None, None)
        if streaming:
            running.add(vec, float(n_ex))
        else:
            held.append(vec)
        weights.append(float(n_ex))
        del vec
    result = running.result() if streaming else robust_combine("median", held)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del result, held
    return peak


def main() -> None:
    p = argparse.ArgumentParser()
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID  # what a run sets: Messages need it
    p.add_argument("--clients", default="10,100,1000,10000")
    p.add_argument("--hold-max-mb", type=float, default=500.0,
                   help="the hold-all path runs only while the held replies stay under this many MB (its memory grows)")
    p.add_argument("--out", default="bench/results/aggregation_memory.json")
    args = p.parse_args()
    sizes = upload_sizes()
    rows = []
    for n in [int(c) for c in args.clients.split(",")]:
        for method, size in sizes.items():
            for streaming in (True, False):
                if not streaming and n * size * 4 > args.hold_max_mb * 1e6:
                    continue
                rows.append({"clients": n, "method": method, "numbers": size,
                             "path": "streaming mean" if streaming else "hold all (median)",
                             "peak_bytes": peak_bytes(size, n, streaming)})
                print(json.dumps(rows[-1]), flush=True)
    out = {"what": "fedsb server aggregation peak memory vs clients (no Flower)", "machine": machine(), "rows": rows,
           "goal": "streaming peak independent of the client count"}
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
