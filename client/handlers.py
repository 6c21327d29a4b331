"""``FedSBClient``: the client side of the protocol, as plain handler functions for any ``ClientApp``.

The public client-side API: a Flower user with their own ``ClientApp`` (and, optionally, their own
``Task``) registers ``query``, ``train`` and ``evaluate`` of one ``FedSBClient``. Everything a method
or DP changes is behind ``Method.client_model`` and the trainer chosen once from the config.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.dp import DPTrainer
from client.node import NodeSettings
from client.trainers import LocalTrainer
from fedsb import adapters
from fedsb.config import FedSBConfig
from fedsb.methods import Download, method_for
from fedsb.methods.fed_sb import BasisSeedMismatch
from fedsb.tasks import Task, get_task
from fedsb.tasks.models import freeze
from fedsb.tasks.own import OwnModelTask
from fedsb.tasks.training import peak_memory_bytes, reset_peak_memory
from fedsb.upload import decode_vector, quantize_update, rounding_generator
from fedsb.wire import decode_basis, flatten, pack_signs, unflatten_into

log = logging.getLogger("fedsb.client")


def _process_start() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # psutil missing or refused: the age is then counted from this import
        return time.time()


PROCESS_START = _process_start()


class ContextStore:
    """A node's Flower state (``context.state``) as fedsb's ``NodeStore``: arrays and a small config."""

    def __init__(self, context: Context):
        self.state = context.state

    def get(self, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        arrays, meta = self.state.array_records.get(key), self.state.config_records.get(key + "-meta")
        if arrays is None and meta is None:
            return None
        return ({k: v.numpy() for k, v in arrays.items()} if arrays is not None else {},
                dict(meta) if meta is not None else {})

    def put(self, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> None:
        if arrays:
            self.state[key] = ArrayRecord({k: _arr(v) for k, v in arrays.items()})
        if meta is not None:
            self.state[key + "-meta"] = ConfigRecord(meta)


def _arr(vec: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(vec))


def train_reply_content(vec: np.ndarray | dict[str, np.ndarray], metrics: dict, fingerprint: str) -> RecordDict:
    """What a client uploads each round: one flat float32 vector (R matrices and head), or its quantized update
    (``upload_arrays``), metrics, fingerprint."""
    named = vec if isinstance(vec, dict) else {"adapter": vec}
    return RecordDict({
        "adapter": ArrayRecord({k: _arr(v) for k, v in named.items()}),
        "metrics": MetricRecord(metrics),
        "config": ConfigRecord({"status": "ok", "fingerprint": fingerprint}),
    })


def upload_arrays(cfg: FedSBConfig, method, model, sent: np.ndarray, private: bool, rnd: int, pid: int
                  ) -> dict[str, np.ndarray]:
    """upload-dtype=float32: the trained vector as it is; int8/int4: the update (trained less sent) in codes,
    a segment per trainable tensor. The rounding noise is seeded by (seed, round, partition) for a reproducible
    run, and fresh OS entropy under DP (a noise the server could recompute would be no randomization)."""
    vec = method.get_vector(model)
    if cfg.upload_dtype == "float32":
        return {"adapter": vec}
    segments = [t.numel() for t in method.trainable(model).values()]
    rng = rounding_generator(None if private else np.random.SeedSequence([cfg.seed, rnd, pid]))
    return quantize_update(vec - sent, segments, cfg.upload_dtype, rng)


def received_vector(cfg: FedSBConfig, method, model, msg: Message) -> np.ndarray:
    """The global vector a train message carries: float32, or (download-dtype int8/int4) its codes dequantized,
    a segment per trainable tensor as uploads; a message that does not fit is refused with the reason."""
    got = {k: v.numpy() for k, v in msg.content["adapter"].items()}
    if cfg.download_dtype == "float32":
        return got["adapter"]
    try:
        return decode_vector(got, [t.numel() for t in method.trainable(model).values()], cfg.download_dtype)
    except ValueError as e:
        raise ValueError(f"refusing the server's broadcast (download-dtype={cfg.download_dtype}): {e}") from None


def download_of(msg: Message) -> Download:
    c, recs = msg.content["config"], msg.content.array_records
    basis = {k: v.numpy() for k, v in recs["basis"].items()} if "basis" in recs else {}
    return Download(round=int(c.get("round", 0)), fingerprint=str(c.get("fingerprint", "")),
                    basis=decode_basis(basis) if basis and "basis_seed" not in basis else None,
                    basis_seed=int(basis["basis_seed"][0]) if "basis_seed" in basis else None,
                    extra={k: v.numpy() for k, v in recs["extra"].items()} if "extra" in recs else {}, config=dict(c))


def model_or_need_basis(task: Task, method, msg: Message, context: Context):
    """(model, None), or (None, the reply that asks the server for the basis again)."""
    download = download_of(msg)
    try:
        model = method.client_model(task, download, ContextStore(context))
        failed = False
    except BasisSeedMismatch as e:
        log.warning("%s: asking for the matrices", e)
        model, failed = None, True
    if model is not None:
        return model, None
    config = {"status": "need-basis", "fingerprint": download.fingerprint, "basis-seed-failed": failed}
    return None, Message(RecordDict({"config": ConfigRecord(config)}), reply_to=msg)


def trainer_for(cfg: FedSBConfig, node: NodeSettings | None = None) -> LocalTrainer:
    return DPTrainer(cfg, node or NodeSettings()) if cfg.dp else LocalTrainer(cfg)


class FedSBClient:
    def __init__(self, task_for: Callable[[FedSBConfig], Task] = get_task):
        self.task_for = task_for

    @classmethod
    def from_functions(cls, model_fn: Callable[[], torch.nn.Module],
                       data_fn: Callable[[Context], tuple[Any, Any, list[str]]]) -> "FedSBClient":
        """The client on your own model and this node's own data, for a ``ClientApp`` of yours (task=seq-cls).

        ``model_fn()`` returns the base model, e.g. ``AutoModelForSequenceClassification.from_pretrained(path,
        num_labels=2)``: the same weights as the server's (the basis fingerprint checks it), called once per
        process. ``data_fn(context)`` returns this node's ``(train, test, label_names)``: tokenized examples
        (dicts with ``input_ids``, ``attention_mask``..., and an integer ``labels``/``label``; a list or a
        tokenized ``datasets.Dataset``), called once per node; ``test`` is what federated evaluation reads.

        Two functions rather than a ``Task`` subclass: a Flower app already has a model factory and a
        ``load_data(partition_id, ...)``, and these are what it passes; the ``Task`` fedsb needs (loss,
        evaluation, batching, target layers, fingerprint) is built from them (``OwnModelTask``). The node's
        ``--node-config`` still gives its threads, DP bounds and rank; its ``dataset``/``model`` are yours."""
        return _FunctionsClient(model_fn, data_fn)

    def setup(self, context: Context) -> tuple[FedSBConfig, Task, NodeSettings]:
        """The run's config, this node's task (its own file and model where its node config names them) and
        its settings; torch gets the node's thread count."""
        node = NodeSettings.from_node_config(context.node_config)
        torch.set_num_threads(node.threads())
        cfg = FedSBConfig.from_run_config(context.run_config)
        return cfg, self.task_for(node.task_config(cfg)), node

    @staticmethod
    def train_dataset(task: Task, cfg: FedSBConfig, node: NodeSettings):
        """This node's training examples: its own file less its held-out slice, or (simulations, the bundled
        data) its partition of the shared training split."""
        if node.dataset:
            return task.data.dataset.subset(task.data.train_idx)
        return task.data.client_dataset(node.partition_id, node.num_partitions, cfg)

    @staticmethod
    def eval_dataset(task: Task, cfg: FedSBConfig, node: NodeSettings):
        """What federated evaluation reads, never a training example: a node with its own file, its seeded
        held-out slice; a partition of the shared data, its share of the held-out split (in seeded order, so
        each share is a random sample of it)."""
        if node.dataset:
            return task.data.dataset.subset(task.data.test_idx)
        return task.data.dataset.subset(np.array_split(task.data.test_idx, node.num_partitions)[node.partition_id])

    @staticmethod
    def method_for(cfg: FedSBConfig, task: Task, node: NodeSettings):
        """The method at this node's own rank (nested ranks: its node-config ``rank`` or client-ranks)."""
        method = method_for(cfg)
        method.rank = cfg.rank_of_partition(node.partition_id, node.rank)
        return method

    def query(self, msg: Message, context: Context) -> Message:
        """``hello``: partition, size and model content id; ``basis``: the basis ahead of a SecAgg+ round;
        ``fed-sb-init``: the sum of ∂L/∂W0 over up to init-samples local examples."""
        cfg, task, node = self.setup(context)
        pid = node.partition_id
        ds = self.train_dataset(task, cfg, node)
        metrics = {"partition-id": pid, "num-train-examples": len(ds)}
        own_rank = cfg.rank_of_partition(pid, node.rank)
        if own_rank != cfg.rank:  # nested ranks: the server sends this node only its leading block
            metrics["rank"] = own_rank
        config = msg.content["config"]
        mode = config["mode"]
        if mode == "basis":  # SecAgg+ round messages carry only FitIns, so the basis comes in a query
            self.method_for(cfg, task, node).client_model(task, download_of(msg), ContextStore(context))
            return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
        if mode != "fed-sb-init":  # hello: also which model this node holds, so a server can refuse a different one
            identity = ConfigRecord({"model-id": task.model_id, "model-path": str(task.model_path)})
            return Message(RecordDict({"metrics": MetricRecord({**metrics, "num-examples": len(ds)}),
                                       "config": identity}), reply_to=msg)
        t0 = time.time()
        reset_peak_memory(task.device)
        model = task.base_model()
        head = {n: p for n, p in model.named_parameters() if any(n.startswith(h + ".") for h in adapters.head_prefixes(model))}
        unflatten_into(head, msg.content["head"]["head"].numpy())  # same head as the server's, so same gradient
        layers = list(config["layers"])
        sums, count, extra = trainer_for(cfg, node).init_gradient(task, model, layers, ds, pid, config, ContextStore(context))
        metrics.update(extra)
        metrics["peak-memory-bytes"] = peak_memory_bytes(task.device)
        vec = flatten({n: sums[n] for n in layers})
        upload = {"signs": pack_signs(vec)} if config.get("upload") == "sign" else {"grads": vec}
        log.info("partition %d: init gradient over %d examples in %.1fs", pid, count, time.time() - t0)
        key = next(iter(upload))
        return Message(RecordDict({key: ArrayRecord({key: _arr(upload[key])}),
                                   "metrics": MetricRecord({**metrics, "num-examples": count}),
                                   "config": ConfigRecord({"layers-fingerprint": config.get("layers-fingerprint", "")})}),
                       reply_to=msg)

    def train(self, msg: Message, context: Context) -> Message:
        t_enter = time.time()
        cfg, task, node = self.setup(context)
        pid, t_setup = node.partition_id, time.time()
        download = download_of(msg)
        method, fp, rnd = self.method_for(cfg, task, node), download.fingerprint, download.round
        if int(download.config.get("rank", cfg.rank)) != method.rank:
            raise ValueError(f"the server sent a rank-{download.config.get('rank', cfg.rank)} block to a node that "
                             f"trains at rank {method.rank}")
        model, ask = model_or_need_basis(task, method, msg, context)
        if model is None:
            log.info("partition %d: lacking basis %s, asking the server for it", pid, fp)
            return ask
        sent = received_vector(cfg, method, model, msg)
        method.set_vector(model, sent)
        t_model = time.time()
        ds = self.train_dataset(task, cfg, node)
        t0 = time.time()
        # where a round's time goes on this node (a deployment starts a fresh process per message)
        timing = {"time-process-age": t_enter - PROCESS_START, "time-setup": t_setup - t_enter,
                  "time-model": t_model - t_setup, "time-data": t0 - t_model}
        reset_peak_memory(task.device)
        trainer = trainer_for(cfg, node)
        loss, metrics = trainer.train(task, model, ds, pid, rnd, download.config, ContextStore(context))
        if loss is None:  # training this round would overspend the run's or this node's privacy budget
            reason = str(metrics.pop("refused", "privacy budget spent"))
            return Message(RecordDict({"metrics": MetricRecord(metrics), "config": ConfigRecord(
                {"status": "budget-exhausted", "fingerprint": fp, "reason": reason})}), reply_to=msg)
        metrics.update({"num-examples": len(ds), "seconds": time.time() - t0,
                        "peak-memory-bytes": peak_memory_bytes(task.device), **timing})
        if trainer.private:
            # Under DP the loss on the raw local batches is not privatized, so it stays on the client (logged
            # here, never uploaded); only the noised update and the accountant's figures leave the node.
            log.info("partition %d round %d: local train loss %.4f (kept on this node: dp=true)", pid, rnd, loss)
        else:
            metrics["train-loss"] = float(loss)
        upload = upload_arrays(cfg, method, model, sent, trainer.private, rnd, pid)
        return Message(train_reply_content(upload, metrics, fp), reply_to=msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        """Evaluate the global adapter on this node's local data (federated evaluation)."""
        cfg, task, node = self.setup(context)
        method = self.method_for(cfg, task, node)
        model, ask = model_or_need_basis(task, method, msg, context)
        if model is None:
            return ask
        method.set_vector(model, msg.content["adapter"]["adapter"].numpy())
        ds = self.eval_dataset(task, cfg, node)
        m = task.evaluate(model, task.loader(ds, shuffle=False, batch_size=64))
        m = {k: float(v) for k, v in m.items() if v is not None}
        return Message(RecordDict({"metrics": MetricRecord(m), "config": ConfigRecord({"status": "ok"})}), reply_to=msg)


class _FunctionsClient(FedSBClient):
    """``FedSBClient.from_functions``: the task comes from the user's two functions instead of ``task_for``."""

    def __init__(self, model_fn: Callable[[], torch.nn.Module], data_fn: Callable[[Context], tuple[Any, Any, list[str]]]):
        super().__init__()
        self.model_fn, self.data_fn = model_fn, data_fn
        self.tasks: dict[tuple[int, FedSBConfig], OwnModelTask] = {}  # a simulated process serves many nodes

    def setup(self, context: Context) -> tuple[FedSBConfig, Task, NodeSettings]:
        node = NodeSettings.from_node_config(context.node_config)
        torch.set_num_threads(node.threads())
        cfg = FedSBConfig.from_run_config(context.run_config)
        key = (context.node_id, cfg)
        if key not in self.tasks:
            frozen = next((t.frozen for (_, c), t in self.tasks.items() if c == cfg), None)
            if frozen is None:
                with torch.random.fork_rng():  # a new head's random init neither reads nor moves the node's RNG
                    torch.manual_seed(cfg.seed)
                    frozen = freeze(self.model_fn(), cfg.torch_base_dtype, cfg.train_pooler)  # as a loaded model
            train, test, label_names = self.data_fn(context)
            self.tasks[key] = OwnModelTask.from_model(cfg, frozen, train, test, label_names,
                                                      getattr(self.model_fn, "__qualname__", "model_fn"))
        return cfg, self.tasks[key], node

    @staticmethod
    def train_dataset(task: Task, cfg: FedSBConfig, node: NodeSettings):
        return task.data.dataset.subset(task.data.train_idx)

    @staticmethod
    def eval_dataset(task: Task, cfg: FedSBConfig, node: NodeSettings):
        return task.data.dataset.subset(task.data.test_idx)
