"""Flower ClientApp: init gradient (query), local training (train), local evaluation (evaluate).

Thin glue over ``fedsb``. The basis (B, A) is kept in the node's ``context.state`` and in an on-disk
cache keyed by its fingerprint, so a node receives it once; a node that has it in neither (e.g. a
restarted SuperNode with an empty cache) answers ``status=need-basis`` and the server sends it again.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsb import adapters
from fedsb.basis_cache import BasisCache
from fedsb.config import FedSBConfig
from fedsb.init import accumulate_gradients, basis_fingerprint
from fedsb.methods import FLoRA, FedSB, flatten, unflatten_into
from fedsb.task import Task, get_task
from fedsb.training import evaluate, train_steps

log = logging.getLogger("fedsb.client")

app = ClientApp()

# Per-process cache of the adapted model for the current basis: a simulated client process serves many
# rounds (and nodes); re-building the model each message would dominate the round time.
_MODEL_CACHE: dict[tuple, torch.nn.Module] = {}


def _setup(context: Context) -> tuple[FedSBConfig, Task, int, int]:
    torch.set_num_threads(int(os.environ.get("FEDSB_CLIENT_THREADS", "1")))
    cfg = FedSBConfig.from_run_config(context.run_config)
    pid = int(context.node_config.get("partition-id", 0))
    nparts = int(context.node_config.get("num-partitions", 1))
    return cfg, get_task(cfg), pid, nparts


def _arr(vec: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(vec))


def _client_seed(cfg: FedSBConfig, pid: int, rnd: int) -> int:
    return (cfg.seed * 1_000_003 + pid * 7919 + rnd) % (2**31)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """``fed-sb-init``: sum of ∂L/∂W0 over up to init-samples local examples; ``hello``: just counts."""
    cfg, task, pid, nparts = _setup(context)
    ds = task.data.client_dataset(pid, nparts, cfg)
    metrics = {"partition-id": pid, "num-train-examples": len(ds)}
    mode = msg.content["config"]["mode"]
    if mode == "basis":  # the basis ahead of a SecAgg+ round (those messages carry only FitIns)
        _basis_for(msg, context, msg.content["config"]["fingerprint"])
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
    if mode != "fed-sb-init":
        return Message(RecordDict({"metrics": MetricRecord({**metrics, "num-examples": len(ds)})}), reply_to=msg)
    t0 = time.time()
    model = task.base_model()
    head = {n: p for n, p in model.named_parameters() if any(n.startswith(h + ".") for h in adapters._head_prefixes(model))}
    unflatten_into(head, msg.content["head"]["head"].numpy())  # same head as the server's, so same gradient
    layers = list(msg.content["config"]["layers"])
    if cfg.dp:
        from client.dp import private_init_gradient

        sums, count, dp_metrics = private_init_gradient(cfg, task, model, layers, ds, msg, context)
        metrics.update(dp_metrics)
    else:
        g = torch.Generator().manual_seed(_client_seed(cfg, pid, 0))
        idx = torch.randperm(len(ds), generator=g)[: cfg.init_samples].numpy()
        sums, count = accumulate_gradients(model, layers, task.loader(ds.subset(idx), shuffle=False), task.loss_fn)
    vec = np.concatenate([sums[n].reshape(-1).numpy() for n in layers]).astype(np.float32)
    log.info("partition %d: init gradient over %d examples in %.1fs", pid, count, time.time() - t0)
    return Message(
        RecordDict({"grads": ArrayRecord({"grads": _arr(vec)}), "metrics": MetricRecord({**metrics, "num-examples": count})}),
        reply_to=msg,
    )


def _basis_for(msg: Message, context: Context, fingerprint: str) -> np.ndarray | None:
    """The basis vector for ``fingerprint``: from the message, the node state, or the disk cache."""
    cache = BasisCache()
    if "basis" in msg.content.array_records:
        rec = msg.content["basis"]
        if "basis_bf16" in rec:
            bits = torch.from_numpy(rec["basis_bf16"].numpy().astype(np.uint16).view(np.int16))
            vec = bits.view(torch.bfloat16).float().numpy()
        else:
            vec = rec["basis"].numpy()
        context.state["fedsb-basis"] = ArrayRecord({"basis": _arr(vec)})
        context.state["fedsb-basis-meta"] = ConfigRecord({"fingerprint": fingerprint})
        cache.put(fingerprint, vec)
        return vec
    meta = context.state.config_records.get("fedsb-basis-meta")
    if meta is not None and meta["fingerprint"] == fingerprint:
        return context.state["fedsb-basis"]["basis"].numpy()
    vec = cache.get(fingerprint)
    if vec is not None:
        context.state["fedsb-basis"] = ArrayRecord({"basis": _arr(vec)})
        context.state["fedsb-basis-meta"] = ConfigRecord({"fingerprint": fingerprint})
    return vec


def _model_for(cfg: FedSBConfig, task: Task, msg: Message, context: Context, rnd: int):
    """The adapted model for this message (cached per process), or None if the basis is missing."""
    method = task.method()
    if not isinstance(method, FedSB):
        model = task.base_model()
        method.build(model, task.layer_names, round_idx=rnd)
        extra = {k: v.numpy() for k, v in msg.content["extra"].items()} if "extra" in msg.content.array_records else {}
        if isinstance(method, FLoRA):
            # FLoRA: the node keeps every folded stack; the server sends only the ones it lacks
            stored = context.state.array_records.get("fedsb-flora")
            held = {k: v.numpy() for k, v in stored.items()} if stored is not None else {}
            held.update(extra)
            total = int(msg.content["config"].get("flora-stacks", 0))
            if sorted(held) != sorted(f"stack-{t}" for t in range(total)):
                return None, method  # lost state (restart): ask for all stacks again
            context.state["fedsb-flora"] = ArrayRecord({k: _arr(v) for k, v in held.items()})
            extra = held
        method.apply_extra(model, extra)
        return model, method
    fp = msg.content["config"]["fingerprint"]
    key = (cfg, fp)
    vec = _basis_for(msg, context, fp)
    if vec is None:
        return None, method
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()  # one basis at a time per process
        model = task.base_model()
        layers = method.build(model, task.layer_names)
        parts = {k: v for n, l in layers.items() for k, v in ((n + ".B", l.sb_B), (n + ".A", l.sb_A))}
        unflatten_into(parts, vec)
        got = basis_fingerprint(task.model_path, cfg.rank, {n: (l.sb_B, l.sb_A) for n, l in layers.items()})
        if got != fp:
            raise RuntimeError(f"basis does not match its fingerprint ({got} != {fp}): corrupt transfer or cache")
        _MODEL_CACHE[key] = model
    return _MODEL_CACHE[key], method


def secagg_if_asked(msg: Message, context: Context, call_next):
    """SecAgg+ (Flower's secaggplus_mod) for the messages of a SecAgg+ round, a no-op for the others."""
    from flwr.client.mod import secaggplus_mod

    if "secaggplus_configs" in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _legacy_to_plain(msg: Message) -> Message:
    """A SecAgg+ round's FitIns as the plain train message the handler understands."""
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    vec = parameters_to_ndarrays(fitins.parameters)[0]
    msg.content["adapter"] = ArrayRecord({"adapter": _arr(vec)})
    msg.content["config"] = ConfigRecord(dict(fitins.config))
    return msg


def _plain_to_legacy(reply: Message, msg: Message) -> Message:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    c = reply.content
    if c["config"].get("status") != "ok":
        raise RuntimeError(f"cannot take part in this SecAgg+ round: {c['config'].get('status')}")
    metrics = {k: v for k, v in c["metrics"].items() if isinstance(v, (int, float))}
    metrics["fingerprint"] = c["config"]["fingerprint"]
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([c["adapter"]["adapter"].numpy()]),
                    int(c["metrics"]["num-examples"]), metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


@app.train(mods=[secagg_if_asked])
def train(msg: Message, context: Context) -> Message:
    if "fitins.parameters" in msg.content.array_records:  # a SecAgg+ round (legacy FitIns)
        return _plain_to_legacy(_train(_legacy_to_plain(msg), context), msg)
    return _train(msg, context)


def _train(msg: Message, context: Context) -> Message:
    cfg, task, pid, nparts = _setup(context)
    rnd = int(msg.content["config"]["round"])
    model, method = _model_for(cfg, task, msg, context, rnd)
    fp = msg.content["config"]["fingerprint"]
    if model is None:
        log.info("partition %d: lacking basis %s, asking the server for it", pid, fp)
        return Message(RecordDict({"config": ConfigRecord({"status": "need-basis", "fingerprint": fp})}), reply_to=msg)
    method.set_vector(model, msg.content["adapter"]["adapter"].numpy())
    ds = task.data.client_dataset(pid, nparts, cfg)
    seed = _client_seed(cfg, pid, rnd)
    t0 = time.time()
    metrics: dict = {}
    if cfg.dp:
        from client.dp import private_local_train

        loss, dp_metrics = private_local_train(cfg, task, model, ds, msg, context)
        metrics.update(dp_metrics)
        if loss is None:  # training this round would overspend the privacy budget
            return Message(RecordDict({"metrics": MetricRecord(dp_metrics),
                                       "config": ConfigRecord({"status": "budget-exhausted", "fingerprint": fp})}),
                           reply_to=msg)
    else:
        torch.manual_seed(seed)
        loader = task.loader(ds, shuffle=True, seed=seed)
        loss = train_steps(model, loader, cfg.local_steps, cfg.learning_rate, task.loss_fn, cfg.weight_decay,
                           desc=f"partition {pid} round {rnd}", progress=os.environ.get("FEDSB_PROGRESS", "1") == "1")
    metrics.update({"num-examples": len(ds), "seconds": time.time() - t0})
    if not cfg.dp:
        # Under DP the loss on the raw local batches is not privatized, so it stays on the client (logged
        # here, never uploaded); only the noised update and the accountant's figures leave the node.
        metrics["train-loss"] = float(loss)
    else:
        log.info("partition %d round %d: local train loss %.4f (kept on this node: dp=true)", pid, rnd, loss)
    return Message(train_reply_content(method.get_vector(model), metrics, fp), reply_to=msg)


def train_reply_content(vec: np.ndarray, metrics: dict, fingerprint: str) -> RecordDict:
    """What a client uploads each round: one flat float32 vector (R matrices and head), metrics, fingerprint."""
    return RecordDict({
        "adapter": ArrayRecord({"adapter": _arr(vec)}),
        "metrics": MetricRecord(metrics),
        "config": ConfigRecord({"status": "ok", "fingerprint": fingerprint}),
    })


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the global adapter on this node's local data (federated evaluation)."""
    cfg, task, pid, nparts = _setup(context)
    model, method = _model_for(cfg, task, msg, context, int(msg.content["config"]["round"]))
    if model is None:
        return Message(RecordDict({"config": ConfigRecord({"status": "need-basis"})}), reply_to=msg)
    method.set_vector(model, msg.content["adapter"]["adapter"].numpy())
    ds = task.data.client_dataset(pid, nparts, cfg)
    m = evaluate(model, task.loader(ds, shuffle=False, batch_size=64), task.loss_fn, cfg.task)
    m = {k: float(v) for k, v in m.items() if v is not None}
    return Message(RecordDict({"metrics": MetricRecord(m), "config": ConfigRecord({"status": "ok"})}), reply_to=msg)
