"""An in-process Flower federation: the real ServerApp and ClientApp, no Ray, no SuperLink.

``InProcessGrid`` implements Flower's ``Grid`` interface by calling the ClientApp directly
(``client_app(message, context)``, Flower's public ``ClientApp.__call__``), one node after another in the
order the messages were pushed, so a run is deterministic and takes seconds. What the real runtimes do
and this keeps:

- every node has its own ``Context`` (node_id, node_config with partition-id/num-partitions, run_config
  and a ``state`` that persists across its messages), and a node's state is only updated when its
  ClientApp returned (a raising ClientApp leaves it as it was, like Flower's SuperNode);
- messages and contexts cross a serialization boundary (Flower's protobuf serde), as over the wire: a
  ClientApp that changes a message it received never changes the server's copy, and content that could
  not travel fails here too;
- replies carry the metadata Flower's ``Message(..., reply_to=msg)`` gives them, checked with Flower's own
  validator and against the message they answer (a reply that fails is dropped and logged, as the
  SuperLink does); a ClientApp that raises becomes an error reply with Flower's code and reason;
- what a ClientApp changes in process-wide state Ray would have kept in a worker process (torch threads,
  default dtype, grad mode, the global RNGs) is put back after each call, so the server sees the same process it
  would in a deployment.

What it does not test: Ray, gRPC, node churn, timeouts, parallel clients. ``tests/test_simulation.py``
(Ray) and ``tests/test_deployment.py`` (real processes) cover those.

Usable outside the tests for fast debugging::

    PYTHONPATH=. python -c "from lab.inprocess_grid import run_inprocess; print(run_inprocess({...}, 3))"

Hand-written because Flower ships no synchronous in-process Grid: its ``InMemoryGrid`` needs a
LinkState and a Fleet runtime (Ray or SuperNodes) to answer.
"""

from __future__ import annotations

import contextlib
import logging
import random
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import now
from flwr.serverapp import Grid, ServerApp

from client.flower_private import (
    NUM_PARTITIONS_KEY, PARTITION_ID_KEY, SUPERLINK_NODE_ID, ErrorCode, Run, TaskIdentity, context_from_proto,
    context_to_proto, message_from_proto, message_to_proto, validate_message,
)

log = logging.getLogger("fedsb.inprocess")


def _over_the_wire(msg: Message) -> Message:
    return message_from_proto(message_to_proto(msg))


@contextlib.contextmanager
def _own_process() -> Iterator[None]:
    """Undo what a ClientApp call changes process-wide, which in Ray or a deployment stays in its own process."""
    threads, dtype, grad = torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled()
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(grad)
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])


class InProcessGrid(Grid):
    """A ``Grid`` whose nodes are ``client_app`` calls in this process (see the module docstring)."""

    def __init__(self, client_app: ClientApp, run_config: Mapping[str, Any], num_nodes: int,
                 node_configs: list[Mapping[str, Any]] | None = None, run_id: int = 1, seed: int = 0):
        if node_configs is not None and len(node_configs) != num_nodes:
            raise ValueError(f"node_configs has {len(node_configs)} entries for {num_nodes} nodes")
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        rng = random.Random(seed)  # node ids as random as Flower's, the same every run
        self.contexts: dict[int, Context] = {}
        for pid in range(num_nodes):
            node_id = rng.getrandbits(63) or 1
            node_config = {PARTITION_ID_KEY: pid, NUM_PARTITIONS_KEY: num_nodes, **(node_configs or [{}] * num_nodes)[pid]}
            self.contexts[node_id] = Context(run_id=run_id, node_id=node_id, node_config=node_config,
                                             state=RecordDict(), run_config=dict(run_config))
        self._pending: dict[str, Message] = {}  # pushed, not yet handled, in push order
        self._replies: dict[str, Message] = {}  # reply_to id -> reply, not yet pulled
        self._next_id = 0

    # -- Grid ------------------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> Run:
        return Run(**vars(self._run))

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = self._new_id()
            errors = validate_message(msg, is_reply_message=False)
            if errors:
                raise ValueError(f"invalid message to node {msg.metadata.dst_node_id}: {errors}")
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"no node {msg.metadata.dst_node_id} in this grid ({sorted(self.contexts)})")
            self._pending[msg.metadata.message_id] = _over_the_wire(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        for mid in [m for m in self._pending if m in wanted]:  # push order: deterministic
            self._deliver(self._pending.pop(mid))
        return [self._replies.pop(mid) for mid in list(self._replies) if mid in wanted]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # -- one node handling one message -----------------------------------------------------------
    def _new_id(self) -> str:
        self._next_id += 1
        return str(uuid.UUID(int=self._next_id))

    def _deliver(self, ins: Message) -> None:
        node_id = ins.metadata.dst_node_id
        ins.metadata.delivered_at = now().isoformat()
        context = context_from_proto(context_to_proto(self.contexts[node_id]))
        try:
            with _own_process():
                reply = self.client_app(ins, context)
            self.contexts[node_id] = context_from_proto(context_to_proto(context))
        except Exception as ex:  # noqa: BLE001 - as Flower's SuperNode: every ClientApp error becomes a reply
            log.error("ClientApp of node %d raised an exception", node_id, exc_info=ex)
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"  # Flower's format (flwr.supernode run_clientapp)
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=ins)
        reply.metadata.__dict__["_message_id"] = self._new_id()
        errors = validate_message(reply, is_reply_message=True)
        if reply.metadata.reply_to_message_id != ins.metadata.message_id or reply.metadata.src_node_id != node_id:
            errors.append("the reply does not answer the message its node received")
        if errors:  # the SuperLink drops such a reply: the server never sees it
            log.error("node %d: reply dropped: %s", node_id, errors)
            return
        self._replies[ins.metadata.message_id] = _over_the_wire(reply)


def run_inprocess(run_config: Mapping[str, Any], num_nodes: int, node_configs: list[Mapping[str, Any]] | None = None,
                  client_app: ClientApp | None = None, server_app: ServerApp | None = None) -> Path:
    """One federated run of the project's ServerApp over an ``InProcessGrid``; returns the run directory.

    ``run_config`` is validated and completed with the defaults, as ``fedsb simulate`` does, and every node
    and the server receive the same full config. Raises if the run did not write its summary."""
    from fedsb.config import FedSBConfig

    if server_app is None:
        from server.app import app as server_app
    if client_app is None:
        from client.app import app as client_app
    cfg = FedSBConfig.from_run_config(dict(run_config))
    if not cfg.output_dir:
        raise ValueError("run_inprocess needs run_config['output-dir']")
    cfg = cfg.replace(output_dir=str(Path(cfg.output_dir).expanduser().resolve()))
    full = cfg.to_run_config()
    grid = InProcessGrid(client_app, full, num_nodes, node_configs)
    # what Flower's runtimes set before a ServerApp runs: messages the server creates carry these
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
    server_app(grid, Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                             run_config=dict(full)))
    run_dir = Path(cfg.output_dir)
    if not (run_dir / "summary.json").is_file():
        raise RuntimeError(f"the run ended without writing {run_dir / 'summary.json'}: it failed (see the log)")
    return run_dir
