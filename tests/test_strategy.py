"""FedSB as a Flower strategy: composition with Flower's own DP wrapper, waiting for nodes at most once,
and the one metrics row of a train round."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import tiny_run_config


class FewNodesGrid:
    """A grid with a fixed set of connected nodes (only what ``Nodes.wait`` asks of it)."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _nodes(nodes, timeout=50.0):
    from fedsb.config import FedSBConfig
    from fedsb.run.state import RunState
    from server.nodes import Nodes
    from server.transport import Transport

    cfg = FedSBConfig.from_run_config({"min-available-nodes": 3, "min-train-nodes": 1, "round-timeout": timeout})
    clock = {"t": 0.0, "sleeps": 0}

    def sleep(s):
        clock["t"] += s
        clock["sleeps"] += 1

    state = RunState()
    n = Nodes(cfg, state, Transport(FewNodesGrid(nodes), state.totals, timeout), clock=lambda: clock["t"], sleep=sleep)
    return n, clock


def test_too_few_nodes_waits_one_round_timeout_once_not_every_round():
    nodes, clock = _nodes([1, 2])
    assert nodes.wait(required=False) == [1, 2]
    first = clock["t"]
    assert first >= 50.0  # the first shortfall waits the whole round-timeout for more nodes
    for _ in range(5):  # the rounds after it go on at once with the nodes there are
        assert nodes.wait(required=False) == [1, 2]
    assert clock["t"] == first
    assert nodes.short_of([1, 2]) == 1


def test_too_few_nodes_before_the_first_round_is_an_error():
    nodes, _ = _nodes([1])
    with pytest.raises(RuntimeError, match="min-available-nodes=3"):
        nodes.wait(required=True)


def test_a_round_short_of_nodes_says_so_in_its_row():
    from server.rounds import RoundTally, train_row

    tally = RoundTally(1, np.zeros(4, np.float32), streaming=True)
    assert "short_of_nodes" not in train_row(tally, False, 0, 0, {})
    tally.short_of = 2
    assert train_row(tally, False, 0, 0, {})["short_of_nodes"] == 2


def _wrapped(tiny_bert, sentiment_csv, out):
    from lab.inprocess_grid import run_inprocess
    from tests import wrapped_app

    wrapped_app.SEEN.clear()
    cfg = tiny_run_config(tiny_bert, sentiment_csv, out, **{"num-server-rounds": 1, "fraction-train": 1.0,
                                                            "min-available-nodes": 3})
    return run_inprocess(cfg, 3, server_app=wrapped_app.app), wrapped_app.SEEN


def test_flowers_adaptive_clipping_wraps_fedsb_noise_and_epsilon(tiny_bert, sentiment_csv, tmp_path):
    from flwr.supercore.differential_privacy import compute_stdv

    run_dir, seen = _wrapped(tiny_bert, sentiment_csv, tmp_path / "wrapped")
    clean = seen["clean"][1]
    noisy = seen["result"].arrays["adapter"].numpy()
    dp = seen["wrapper"]
    diff = noisy.astype(np.float64) - clean
    stdv = compute_stdv(dp.noise_multiplier, dp.clipping_norm, 3)
    assert clean.size > 200 and stdv > 0
    # the wrapped aggregate is FedSB's own plus Gaussian noise of the wrapper's std, nothing else
    assert abs(diff.std() / stdv - 1) < 0.2 and abs(diff.mean()) < 4 * stdv / np.sqrt(diff.size)
    from safetensors.torch import load_file

    assert np.array_equal(load_file(str(run_dir / "checkpoint.safetensors"))["global"].numpy(), noisy)
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (train,) = [r for r in rows if r["phase"] == "train"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert train["epsilon"] > 0 and summary["central_dp"]["epsilon"] == pytest.approx(train["epsilon"])
    assert summary["central_dp"]["rounds"] == 1


def test_quantized_uploads_inside_flowers_clipping_wrapper_are_refused_before_anything_starts(tiny_bert, sentiment_csv,
                                                                                               tmp_path):
    # the wrapper would clip int8 codes and scales as if they were the model's arrays (and fail mid-round on their
    # count): refused at start, naming the key, with no run directory made
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping

    from fedsb.config import ConfigError, FedSBConfig
    from server.strategy import FedSB

    out = tmp_path / "never"
    fedsb = FedSB(FedSBConfig.from_run_config(tiny_run_config(tiny_bert, sentiment_csv, out, **{"upload-dtype": "int8"})))
    wrapper = DifferentialPrivacyServerSideAdaptiveClipping(fedsb, noise_multiplier=0.1, num_sampled_clients=3)
    with pytest.raises(ConfigError, match="upload-dtype.*DifferentialPrivacyServerSideAdaptiveClipping.*'float32'"):
        fedsb.start(grid=None, outer=wrapper)
    assert not out.exists()


def test_flowers_own_loop_runs_fedsb_wrapped(tiny_bert, sentiment_csv, tmp_path):
    # Strategy.start of Flower's wrapper: the init query runs in FedSB's first configure_train
    with pytest.raises(RuntimeError, match="summary.json"):  # Flower's loop keeps no run directory
        _wrapped(tiny_bert, sentiment_csv, tmp_path / "flower-loop")
    from tests import wrapped_app

    seen = wrapped_app.SEEN
    assert seen["fedsb"].initialized and seen["fedsb"].state.fingerprint
    clean, noisy = seen["clean"][1], seen["result"].arrays["adapter"].numpy()
    assert clean.shape == noisy.shape and not np.array_equal(clean, noisy)
    assert seen["result"].train_metrics_clientapp[1]["replies"] == 3


def test_secagg_node_restarted_with_empty_cache_gets_the_basis_again(tiny_bert, sentiment_csv, tmp_path, monkeypatch):
    from lab.inprocess_grid import run_inprocess
    from tests.restart_app import RESTARTED, app

    monkeypatch.setenv("FEDSB_CACHE_DIR", str(tmp_path / "cache"))  # the nodes (in this process) read it
    cfg = tiny_run_config(tiny_bert, sentiment_csv, tmp_path / "run", **{
        "secagg": True, "num-server-rounds": 3, "fraction-train": 1.0, "secagg-shares": 3, "secagg-threshold": 2,
        "min-available-nodes": 3})
    run_dir = run_inprocess(cfg, 3, client_app=app)
    train = {r["round"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r["phase"] == "train"}
    restarted_round = RESTARTED[1]
    # the restarted node could not take part (SecAgg+ recovered the round without it) ...
    assert train[restarted_round]["replies"] == 2 and train[restarted_round]["updated"]
    # ... and was sent the basis before the next round, where it counted again
    assert train[restarted_round + 1]["replies"] == 3 and train[restarted_round + 1]["basis_resent"] == 1
    assert train[restarted_round + 1]["bytes_basis"] > 0
    # the SecAgg+ row is the plain round's row: examples, basis_resent, budget_exhausted, client_seconds
    for row in train.values():
        assert row["examples"] > 0 and row["budget_exhausted"] == 0 and row["client_seconds"]
        assert row["secagg"] is True


def test_server_adam_around_fedsb_steps_from_the_exact_mean(tiny_bert, sentiment_csv, tmp_path):
    from safetensors.torch import load_file

    run_dir, seen = _wrapped(tiny_bert, sentiment_csv, tmp_path / "adam")
    x0, mean = seen["before"][1].astype(np.float64), seen["clean"][1].astype(np.float64)
    d = mean - x0  # round 1: m = (1 - β1)·Δ, v = (1 - β2)·Δ²
    step = 0.05 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2) * (0.1 * d) / (np.sqrt(0.01 * d**2) + 1e-3)
    final = load_file(str(run_dir / "checkpoint.safetensors"))["global"].numpy()
    assert np.allclose(final, x0 + step, atol=1e-6) and not np.allclose(final, mean, atol=1e-6)


class FixedAggregate:
    """A stand-in strategy whose aggregate is given (only what ServerAdam calls)."""

    def __init__(self, aggregates):
        self.aggregates = list(aggregates)

    def configure_train(self, server_round, arrays, config, grid):
        return []

    def aggregate_train(self, server_round, replies):
        return self.aggregates.pop(0), None


def test_server_adam_steps_along_the_pseudo_gradient_as_fedadam_does():
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from server.fedopt import ServerAdam

    record = lambda v: ArrayRecord({"adapter": Array(np.asarray(v, np.float32))})  # noqa: E731
    x0, means = np.array([0.0, 1.0, -2.0]), [np.array([0.5, 1.0, -3.0]), np.array([1.0, 0.5, -3.0])]
    adam = ServerAdam(FixedAggregate([record(m) for m in means]), eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    x, m, v = x0.astype(np.float32), 0.0, 0.0
    for rnd, mean in enumerate(means, start=1):
        adam.configure_train(rnd, record(x), ConfigRecord(), None)
        got = adam.aggregate_train(rnd, [])[0]["adapter"].numpy()
        d = mean.astype(np.float32) - x  # Reddi et al. / Flower's FedAdam, written out
        m, v = 0.9 * m + 0.1 * d, 0.99 * v + 0.01 * d**2
        expected = x + 0.1 * np.sqrt(1 - 0.99 ** (rnd + 1)) / (1 - 0.9 ** (rnd + 1)) * m / (np.sqrt(v) + 1e-3)
        assert np.allclose(got, expected, rtol=1e-6, atol=1e-7)
        assert not np.allclose(got, mean)  # a step, not the plain mean
        x = got


@pytest.mark.parametrize("aggregation,nodes,keys", [
    ("median", 3, {}),
    ("krum", 5, {"malicious-nodes": 1, "min-train-nodes": 5, "min-available-nodes": 5})])
def test_flowers_robust_rules_aggregate_a_run_and_resist_a_poisoned_node(aggregation, nodes, keys, tiny_bert,
                                                                         sentiment_csv, tmp_path):
    # aggregation=median|krum is Flower's FedMedian|MultiKrum over the round's replies (server/robust.py), inside a
    # real ServerApp run: one node shifts its R and head by 1e3 every round; the mean would follow it
    from flwr.app import Array, ArrayRecord, Context, Message

    from client import app as real
    from lab.inprocess_grid import run_inprocess
    from tests.hostile_app import real_query_with

    def train(msg: Message, context: Context) -> Message:
        reply = real.train(msg, context)
        if int(context.node_config["partition-id"]) == 0 and reply.content["config"].get("status") == "ok":
            vec = reply.content["adapter"]["adapter"].numpy() + np.float32(1e3)
            reply.content["adapter"] = ArrayRecord({"adapter": Array(vec)})
        return reply

    run = run_inprocess(tiny_run_config(tiny_bert, sentiment_csv, tmp_path / "run", aggregation=aggregation,
                                        **{"num-server-rounds": 2, **keys}), nodes, client_app=real_query_with(train))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["replies"] == nodes and r["rejected_count"] == 0 for r in rows if r.get("phase") == "train"), rows
    s = json.loads((run / "summary.json").read_text())
    assert s["final_accuracy"] >= 0.9, s
