"""Transport: push messages, stream replies back one at a time, and meter the bytes of both.

Apart from the protocol: the rounds say *what* to send and what to do with each reply; this file only
moves messages and counts what crossed the wire (``totals``: bytes_up, bytes_down).
"""

from __future__ import annotations

import logging
import itertools
import time
from collections.abc import Iterable, Iterator
from typing import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from client.flower_private import recorddict_to_proto

log = logging.getLogger("fedsb.server")

# How often replies are pulled: Flower's own send_and_receive sleeps 3 s between pulls in deployment.
POLL_SECONDS = 0.2
PUSH_CHUNK = 64  # messages built and pushed at a time (see Transport.send)

OnReply = Callable[[int, Message, int], None]


def nbytes(content: RecordDict) -> int:
    """Bytes of a message's serialized content (what crosses the wire, framing included)."""
    return recorddict_to_proto(content).ByteSize()


def arrays(**named: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in named.items()})


def arrays_of(reply: Message, key: str) -> dict[str, np.ndarray]:
    rec = reply.content.array_records.get(key)
    return {} if rec is None else {k: v.numpy() for k, v in rec.items()}


class Transport:
    def __init__(self, grid: Grid, totals: dict, timeout: float):
        self.grid, self.totals, self.timeout = grid, totals, timeout

    def send(self, nodes: list[int], mtype: str, content_for: Callable[[int], RecordDict], phase: str,
             on_reply: OnReply) -> list[int]:
        """Push one message per node, metered, then hand each reply to ``on_reply(node, reply, bytes_up)``
        as it arrives (and let it go), until all replied or the timeout passed; returns the nodes that
        timed out."""
        def messages():
            for n in nodes:
                content = content_for(n)
                self.totals["bytes_down"] += nbytes(content)
                yield Message(content, dst_node_id=int(n), message_type=mtype)

        for node, reply in self.pairs(messages(), phase):
            up = 0 if reply.has_error() else nbytes(reply.content)
            self.totals["bytes_up"] += up
            on_reply(node, reply, up)
        return self.timed_out

    def stream(self, messages: Iterable[Message], phase: str) -> Iterator[Message]:
        """Push the messages, then yield each reply as it arrives, until all replied or the timeout passed
        (``timed_out`` then lists the nodes that did not). Flower's send_and_receive would hold every
        reply at once and, in deployment, poll only every 3 s. Not metered: who builds and reads the
        messages counts their bytes."""
        return (reply for _, reply in self.pairs(messages, phase))

    def pairs(self, messages: Iterable[Message], phase: str) -> Iterator[tuple[int, Message]]:
        """(the node a message went to, its reply), as replies arrive."""
        pending: dict[str, int] = {}
        self.timed_out: list[int] = []
        # built and pushed a chunk at a time: every message carries its own copy of the global vector, so
        # building all of them first would hold (number of nodes) copies in this process at once
        it = iter(messages)
        while chunk := list(itertools.islice(it, PUSH_CHUNK)):
            pending.update((mid, m.metadata.dst_node_id) for mid, m in zip(self.grid.push_messages(chunk), chunk))
            del chunk
        deadline = time.time() + self.timeout
        while pending and time.time() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                yield pending.pop(reply.metadata.reply_to_message_id, reply.metadata.src_node_id), reply
            if pending:
                time.sleep(POLL_SECONDS)
        for node in pending.values():
            log.warning("%s: node %d did not reply within %.0fs", phase, node, self.timeout)
        self.timed_out = list(pending.values())

    def metered_grid(self) -> "MeteredGrid":
        return MeteredGrid(self.grid, self.totals)


class MeteredGrid:
    """A Grid that counts the bytes of every message it pushes and pulls (for the SecAgg+ workflow,
    which talks to the grid itself)."""

    def __init__(self, grid: Grid, totals: dict):
        self._grid, self._totals = grid, totals

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def push_messages(self, messages):
        messages = list(messages)
        self._totals["bytes_down"] += sum(nbytes(m.content) for m in messages if m.has_content())
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(self._grid.pull_messages(message_ids))
        self._totals["bytes_up"] += sum(nbytes(m.content) for m in replies if m.has_content())
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        ids = set(self.push_messages(messages))
        end, out = time.time() + (timeout if timeout is not None else 1e9), []
        while ids and time.time() < end:
            got = self.pull_messages(list(ids))
            out.extend(got)
            ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if ids:
                time.sleep(POLL_SECONDS)
        return out
