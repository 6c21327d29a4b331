"""Nested ranks (issue 19): a node at rank k trains the leading k×k block of every R; the server averages
each entry over the clients that trained it; with every k = r it is today's Fed-SB, bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedsb.aggregation.robust import BlockWeightedMean
from fedsb.config import ConfigError, FedSBConfig
from tests.conftest import tiny_run_config


def test_per_entry_mean_equals_a_hand_computed_one():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(10).astype(np.float32)
    blocks = [(np.array([0, 1, 2, 3]), 2.0), (np.array([0, 1]), 3.0), (np.arange(10), 1.0), (np.array([5]), 4.0)]
    acc, expected_num, expected_den = BlockWeightedMean(base), np.zeros(10), np.zeros(10)
    for idx, w in blocks:
        v = rng.standard_normal(len(idx)).astype(np.float32)
        acc.add(v, w, idx)
        expected_num[idx] += w * v.astype(np.float64)
        expected_den[idx] += w
    out = acc.result()
    assert np.allclose(out, expected_num / expected_den, rtol=1e-6)
    acc2 = BlockWeightedMean(base)
    acc2.add(np.ones(2, np.float32), 1.0, np.array([8, 9]))
    assert np.array_equal(acc2.result()[:8], base[:8])  # entries nobody trained keep their global value


def test_full_blocks_are_the_plain_weighted_mean_bit_for_bit():
    """With every index None the block mean is the plain float64 weighted mean Σ wᵢvᵢ / Σ wᵢ, bit for bit."""
    rng = np.random.default_rng(1)
    vecs = [rng.standard_normal(1000).astype(np.float32) for _ in range(5)]
    vecs[0][:10] = -0.0
    block = BlockWeightedMean(np.ones(1000, np.float32))
    terms = [v.astype(np.float64) * (3 + i) for i, v in enumerate(vecs)]
    for i, v in enumerate(vecs):
        block.add(v, 3 + i, None)
    plain = (terms[0] + terms[1] + terms[2] + terms[3] + terms[4]) / float(3 + 4 + 5 + 6 + 7)
    assert block.result().tobytes() == plain.astype(np.float32).tobytes()


def test_block_index_picks_the_leading_block_of_each_r(tiny_bert):
    from fedsb import adapters
    from fedsb.methods import FedSB
    from fedsb.tasks.models import load_base_model

    model = load_base_model(str(tiny_bert), "seq-cls", 3, 0)
    method = FedSB("fed-sb", 4, 1.0)
    method.build(model, adapters.find_targets(model, None))
    layers = len(adapters.adapter_layers(model))
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "sb_R" not in n)
    for k in (1, 2, 3):
        idx = method.block_index(model, k)
        assert len(idx) == layers * k * k + head  # k² numbers per layer, and the whole head
        first_r = np.arange(16).reshape(4, 4)
        assert list(idx[: k * k]) == list(first_r[:k, :k].ravel())
    assert method.block_index(model, 4) is None
    with pytest.raises(ValueError):
        method.block_index(model, 5)


def test_client_ranks_are_validated():
    for bad, fragment in (("2,9", "rank=4"), ("a,b", "comma-separated integers")):
        with pytest.raises(ConfigError) as e:
            FedSBConfig.from_run_config({"rank": 4, "client-ranks": bad})
        assert e.value.key == "client-ranks" and fragment in str(e.value)
    with pytest.raises(ConfigError, match="Fed-SB"):
        FedSBConfig.from_run_config({"method": "fedit", "client-ranks": "2"})
    with pytest.raises(ConfigError, match="secagg"):
        FedSBConfig.from_run_config({"rank": 4, "client-ranks": "2", "secagg": True})
    cfg = FedSBConfig.from_run_config({"rank": 8, "client-ranks": "2,4,8"})
    assert [cfg.rank_of_partition(p) for p in range(4)] == [2, 4, 8, 2] and cfg.rank_of_partition(0, "6") == 6


def test_a_block_larger_than_the_nodes_rank_is_rejected():
    from fedsb.aggregation.validation import InvalidReply, ReplySpec, check_reply

    spec = ReplySpec(shapes={"adapter": (12 * 2 * 2 + 66,)})  # a rank-2 node of the tiny model
    with pytest.raises(InvalidReply) as e:
        check_reply(spec, {"adapter": np.zeros(12 * 4 * 4 + 66, np.float32)}, 10, None)
    assert e.value.reason == "shape"


def _sim(tiny_bert, sentiment_csv, out, **extra):
    from lab.inprocess_grid import run_inprocess

    return run_inprocess(tiny_run_config(tiny_bert, sentiment_csv, out, **extra), 3)


def test_all_ranks_equal_r_is_todays_fed_sb_bit_for_bit(tiny_bert, sentiment_csv, tmp_path):
    from lab.same_run import compare

    a = _sim(tiny_bert, sentiment_csv, tmp_path / "plain", **{"num-server-rounds": 2})
    b = _sim(tiny_bert, sentiment_csv, tmp_path / "nested", **{"num-server-rounds": 2, "client-ranks": "4,4,4"})
    diffs = [d for d in compare(a, b) if "client-ranks" not in d and "client_peak_memory" not in d]
    assert diffs == []


def test_mixed_federation_trains_each_nodes_block(tiny_bert, sentiment_csv, tmp_path):
    run = _sim(tiny_bert, sentiment_csv, tmp_path / "mixed", **{"client-ranks": "1,2,4", "num-server-rounds": 2})
    s = json.loads((run / "summary.json").read_text())
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["phase"] == "train"]
    assert s["rank_mix"] == {"1": 1, "2": 1, "4": 1}
    assert all(r["updated"] and r["replies"] == 3 and r["rejected_count"] == 0 for r in train)  # exact shapes
    head = 2 * 32 + 2
    sizes = [12 * k * k + head for k in (1, 2, 4)]
    assert 4 * sum(sizes) / 3 <= train[-1]["bytes_up_per_client"] <= 4 * sum(sizes) / 3 + 1024
    assert s["final_accuracy"] >= 0.8
