"""The in-process grid behaves as Flower's runtimes do where the protocol tests rely on it: per-node
contexts and state, reply metadata, error replies, wire copies, deterministic order, a clean process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from lab.inprocess_grid import InProcessGrid

seen: list[tuple[int, int]] = []  # (partition, count) in the order the ClientApp ran


def _counting_app() -> ClientApp:
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        count = int(context.state.config_records.get("count", ConfigRecord({"n": 0}))["n"]) + 1
        context.state["count"] = ConfigRecord({"n": count})
        pid = int(context.node_config["partition-id"])
        seen.append((pid, count))
        if msg.content["config"].get("fail"):
            raise RuntimeError("asked to fail")
        msg.content["arrays"]["x"].numpy()  # read what arrived...
        msg.content["arrays"] = ArrayRecord({"x": Array(np.zeros(3, np.float32))})  # ...and scribble over it
        torch.set_num_threads(1)
        torch.manual_seed(pid)
        return Message(RecordDict({"metrics": MetricRecord({"pid": pid, "count": count,
                                                            "parts": int(context.node_config["num-partitions"]),
                                                            "lr": float(context.run_config["learning-rate"])})}),
                       reply_to=msg)

    return app


def _ask(grid: InProcessGrid, nodes, fail=False) -> tuple[list[Message], list[Message]]:
    msgs = [Message(RecordDict({"config": ConfigRecord({"fail": fail}),
                                "arrays": ArrayRecord({"x": Array(np.arange(3, dtype=np.float32))})}),
                    dst_node_id=n, message_type="query", group_id="g1") for n in nodes]
    return msgs, list(grid.send_and_receive(msgs))


@pytest.fixture
def grid():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    seen.clear()
    return InProcessGrid(_counting_app(), {"learning-rate": 0.5}, 3, node_configs=[{}, {"rank": 2}, {}])


def test_each_node_has_its_own_context_and_state_that_persists(grid):
    nodes = sorted(grid.get_node_ids())
    assert len(set(nodes)) == 3 and all(n > 0 and n != SUPERLINK_NODE_ID for n in nodes)
    _ask(grid, nodes)
    _, replies = _ask(grid, nodes[:2])
    by_node = {r.metadata.src_node_id: r.content["metrics"] for r in replies}
    assert {n: by_node[n]["count"] for n in by_node} == {nodes[0]: 2, nodes[1]: 2}
    assert all(m["pid"] == grid.contexts[n].node_config["partition-id"] for n, m in by_node.items())
    assert all(m["parts"] == 3 and m["lr"] == 0.5 for m in by_node.values())
    pids = {grid.contexts[n].node_config["partition-id"] for n in nodes}
    assert pids == {0, 1, 2} and [grid.contexts[n].node_config.get("rank") for n in grid.contexts] == [None, 2, None]


def test_replies_carry_flowers_metadata_and_arrive_in_push_order(grid):
    nodes = list(reversed(sorted(grid.get_node_ids())))
    msgs, replies = _ask(grid, nodes)
    assert [r.metadata.reply_to_message_id for r in replies] == [m.metadata.message_id for m in msgs]
    for m, r in zip(msgs, replies):
        assert r.metadata.src_node_id == m.metadata.dst_node_id and r.metadata.dst_node_id == SUPERLINK_NODE_ID
        assert r.metadata.message_type == "query" and r.metadata.group_id == "g1" and r.metadata.run_id == 1
        assert r.metadata.message_id and r.metadata.message_id != m.metadata.message_id
    assert [p for p, _ in seen] == [grid.contexts[n].node_config["partition-id"] for n in nodes]


def test_a_raising_clientapp_gives_flowers_error_reply_and_keeps_its_state(grid):
    n = next(iter(grid.get_node_ids()))
    _ask(grid, [n])
    _, (reply,) = _ask(grid, [n], fail=True)
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason == "<class 'RuntimeError'>:<'asked to fail'>"
    _, (again,) = _ask(grid, [n])
    assert again.content["metrics"]["count"] == 2  # the failed call's state change was not kept


def test_messages_cross_a_wire(grid):
    msgs, replies = _ask(grid, list(grid.get_node_ids()))
    assert all(np.array_equal(m.content["arrays"]["x"].numpy(), np.arange(3)) for m in msgs)  # the server's copy
    assert len(grid.pull_messages([m.metadata.message_id for m in msgs])) == 0  # pulled once, then gone


def test_the_server_process_is_left_as_it_was(grid):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the ClientApp sets 1 and seeds by partition: neither may reach the server
        torch.manual_seed(12345)
        state = torch.get_rng_state()
        _ask(grid, list(grid.get_node_ids()))
        assert torch.get_num_threads() == 2 and torch.equal(torch.get_rng_state(), state)
    finally:
        torch.set_num_threads(threads)


def test_a_reply_to_another_message_is_dropped(grid):
    app = ClientApp()
    other = Message(RecordDict(), dst_node_id=5, message_type="query")
    other.metadata.__dict__["_message_id"] = "not-the-one"

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(RecordDict(), reply_to=other)

    grid.client_app = app
    _, replies = _ask(grid, list(grid.get_node_ids()))
    assert replies == []
