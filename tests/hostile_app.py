"""Test-only ClientApps: the real one, but some partitions corrupt their train replies (or fail)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from client import app as real
from client.secagg import legacy_to_plain, plain_to_legacy, secagg_if_asked

HONEST = (0, 1)
# every kind of bad reply the server must reject, by (partition, round)
KINDS = ["nan", "inf", "shape", "extra-key", "missing-key", "dtype", "fingerprint", "num-examples-zero",
         "num-examples-negative", "num-examples-fraction", "update-norm", "num-examples-huge"]


def kind_for(pid: int, rnd: int) -> str:
    return KINDS[((pid - len(HONEST)) * 3 + (rnd - 1)) % len(KINDS)]


def _corrupt(reply: Message, kind: str) -> Message:
    content = reply.content
    vec = content["adapter"]["adapter"].numpy().copy()
    if kind == "nan":
        vec[0] = np.nan
    elif kind == "inf":
        vec[-1] = np.inf
    elif kind == "shape":
        vec = vec[:-1]
    elif kind == "dtype":
        vec = vec.astype(np.float64)
    elif kind == "update-norm":
        vec = vec + 1e4
    content["adapter"] = ArrayRecord({"adapter": Array(np.ascontiguousarray(vec))})
    if kind == "extra-key":
        content["adapter"] = ArrayRecord({"adapter": Array(vec), "smuggled": Array(np.zeros(3, np.float32))})
    if kind == "missing-key":
        content["adapter"] = ArrayRecord({"other": Array(vec)})
    if kind == "fingerprint":
        content["config"]["fingerprint"] = "0" * 32
    metrics = dict(content["metrics"])
    if kind.startswith("num-examples"):
        metrics["num-examples"] = {"num-examples-zero": 0, "num-examples-negative": -5,
                                   "num-examples-fraction": 2.5, "num-examples-huge": 10**9}[kind]
    content["metrics"] = MetricRecord(metrics)
    return reply


def real_query_with(train, mods=()) -> ClientApp:
    """A ClientApp with fedsb's own query handler (hello, init gradient, basis) and the test's ``train`` handler
    (which usually calls ``real.train`` and bends the message or the reply): what every misbehaving node of the
    tests is."""
    app = ClientApp()
    app.query()(real.query)
    app.train(mods=list(mods))(train)
    return app


def _make(mode: str) -> ClientApp:
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["round"])
        if pid in HONEST:
            return real.train(msg, context)
        if mode == "fail":
            raise RuntimeError("this node does not take part in training")
        reply = real.train(msg, context)
        if reply.content["config"].get("status") != "ok":
            return reply
        return _corrupt(reply, kind_for(pid, rnd))

    return real_query_with(train)


hostile = _make("hostile")
failing = _make("fail")


def _make_recording(drop_partition: int | None) -> ClientApp:
    """The real ClientApp (with SecAgg+), which also saves each client's plain vector for the test to
    compare with what the server computed, and can drop out after sharing its keys."""
    import os

    def record(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if "fitins.parameters" in msg.content.array_records:
            if pid == drop_partition:
                raise RuntimeError("dropping out after sharing keys")
            plain = real.fedsb_client.train(legacy_to_plain(msg), context)
            vec = plain.content["adapter"]["adapter"].numpy()
            rnd = int(msg.content["config"]["round"])
            np.save(os.path.join(os.environ["FEDSB_TEST_DUMP"], f"r{rnd}-p{pid}.npy"),
                    np.concatenate([[float(plain.content["metrics"]["num-examples"])], vec.astype(np.float64)]))
            return plain_to_legacy(plain, msg)
        return real.fedsb_client.train(msg, context)

    return real_query_with(record, mods=[secagg_if_asked])


recording = _make_recording(None)
recording_with_dropout = _make_recording(2)
