"""Reply validation and aggregation rules: every kind of bad reply is refused, and random malformed
replies mixed into honest ones never change the aggregate (hypothesis)."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsb.aggregation import robust
from fedsb.aggregation.validation import REASONS, InvalidReply, ReplySpec, check_num_examples, check_reply, update_norm
from server.robust import robust_combine

FP = "f" * 32
F32_MAX = float(np.finfo(np.float32).max)
SPEC = ReplySpec(shapes={"adapter": (6,)}, fingerprint=FP, max_update_norm=10.0)
REF = {"adapter": np.zeros(6, np.float32)}
GOOD = {"adapter": np.arange(6, dtype=np.float32) / 10}


BAD_CASES = [
    ({}, 5, FP, "missing-key"),
    ({**GOOD, "x": np.zeros(1, np.float32)}, 5, FP, "extra-key"),
    ({**GOOD, 3: np.zeros(1, np.float32)}, 5, FP, "extra-key"),  # a non-string key off the wire
    ({"adapter": np.zeros(5, np.float32)}, 5, FP, "shape"),
    ({"adapter": np.zeros((6, 1), np.float32)}, 5, FP, "shape"),
    ({"adapter": np.zeros(6, np.float64)}, 5, FP, "dtype"),
    ({"adapter": np.zeros(6, np.int32)}, 5, FP, "dtype"),
    ({"adapter": np.zeros(6, ">f4")}, 5, FP, "dtype"),  # big-endian float32 is not the wire dtype
    ({"adapter": [0.0] * 6}, 5, FP, "dtype"),  # not an array at all
    ({"adapter": torch.zeros(6)}, 5, FP, "dtype"),
    ({"adapter": np.array([0, 1, np.nan, 0, 0, 0], np.float32)}, 5, FP, "non-finite"),
    ({"adapter": np.array([0, 1, np.inf, 0, 0, 0], np.float32)}, 5, FP, "non-finite"),
    ({"adapter": np.array([0, 1, -np.inf, 0, 0, 0], np.float32)}, 5, FP, "non-finite"),
    (GOOD, 5, "e" * 32, "fingerprint"),
    (GOOD, 5, None, "fingerprint"),
    ({"adapter": np.full(6, 100, np.float32)}, 5, FP, "update-norm"),
    (GOOD, 0, FP, "num-examples"),
    (GOOD, -3, FP, "num-examples"),
    (GOOD, 2.5, FP, "num-examples"),
    (GOOD, True, FP, "num-examples"),
    (GOOD, np.True_, FP, "num-examples"),
    (GOOD, "7", FP, "num-examples"),
    (GOOD, None, FP, "num-examples"),
    (GOOD, float("nan"), FP, "num-examples"),
    (GOOD, float("inf"), FP, "num-examples"),
    (GOOD, np.float32(np.nan), FP, "num-examples"),
    (GOOD, np.int64(-1), FP, "num-examples"),
]


@pytest.mark.parametrize("arrays, n, fp, reason", BAD_CASES)
def test_each_bad_reply_is_refused_with_its_reason(arrays, n, fp, reason):
    with pytest.raises(InvalidReply) as e:
        check_reply(SPEC, arrays, n, fp, REF)
    assert e.value.reason == reason and e.value.reason in REASONS
    assert str(e.value).startswith(reason + ": ") and e.value.detail


def test_every_reason_is_reachable_and_details_are_clear():
    # "quantization" is raised by the server's decoding of an int8/int4 upload (server.rounds.decode_upload)
    assert {reason for *_, reason in BAD_CASES} == set(REASONS) - {"quantization"}
    with pytest.raises(InvalidReply, match=r"key 'adapter' has shape \(5,\), expected \(6,\)"):
        check_reply(SPEC, {"adapter": np.zeros(5, np.float32)}, 1, FP, REF)
    with pytest.raises(InvalidReply, match=r"key 'adapter' has dtype float64, expected float32"):
        check_reply(SPEC, {"adapter": np.zeros(6)}, 1, FP, REF)
    with pytest.raises(InvalidReply, match=r"holds 2 NaN/Inf"):
        check_reply(SPEC, {"adapter": np.array([np.nan, np.inf, 0, 0, 0, 0], np.float32)}, 1, FP, REF)
    with pytest.raises(InvalidReply, match=r"lacks \['adapter'\]"):
        check_reply(SPEC, {}, 1, FP, REF)


def test_honest_reply_passes():
    assert check_reply(SPEC, GOOD, 7, FP, REF) == 7
    assert check_reply(SPEC, GOOD, 7.0, FP, REF) == 7  # integral floats: Flower metrics may be floats
    assert check_reply(SPEC, GOOD, np.int64(7), FP, REF) == 7
    assert type(check_reply(SPEC, GOOD, np.float32(7.0), FP, REF)) is int
    # no fingerprint and no bound in the spec: neither is checked
    assert check_reply(ReplySpec(shapes={"adapter": (6,)}), GOOD, 1, "anything") == 1
    # the bound is inclusive
    edge = {"adapter": np.array([10, 0, 0, 0, 0, 0], np.float32)}
    assert check_reply(SPEC, edge, 1, FP, REF) == 1
    assert update_norm(edge, REF) == 10.0


def test_update_norm_is_over_all_keys_relative_to_the_reference():
    spec = ReplySpec(shapes={"a": (2,), "b": (1, 1)}, max_update_norm=5.0)
    ref = {"a": np.array([1, 1], np.float32), "b": np.array([[1]], np.float32)}
    ok = {"a": np.array([4, 1], np.float32), "b": np.array([[5]], np.float32)}  # norm sqrt(9+16) = 5
    assert check_reply(spec, ok, 2, None, ref) == 2
    bad = {"a": np.array([4, 1], np.float32), "b": np.array([[5.01]], np.float32)}
    with pytest.raises(InvalidReply) as e:
        check_reply(spec, bad, 2, None, ref)
    assert e.value.reason == "update-norm"
    # a bound without a reference is a programming error, never a silent pass
    with pytest.raises(ValueError, match="no reference"):
        check_reply(spec, ok, 2, None, None)


def test_max_num_examples_and_spec_validation():
    spec = ReplySpec(shapes={"adapter": (6,)}, max_num_examples=100)
    assert check_reply(spec, GOOD, 100, None) == 100
    with pytest.raises(InvalidReply) as e:
        check_reply(spec, GOOD, 101, None)
    assert e.value.reason == "num-examples" and "exceeds" in e.value.detail
    assert check_num_examples(10**12) == 10**12  # no bound by default
    for bad in (dict(max_update_norm=-1.0), dict(max_update_norm=float("nan")), dict(max_update_norm=float("inf")),
                dict(max_num_examples=-1), dict(max_num_examples=True), dict(max_num_examples=2.5)):
        with pytest.raises(ValueError):
            ReplySpec(shapes={"adapter": (6,)}, **bad)
    assert ReplySpec(shapes={"a": [3]}).shapes == {"a": (3,)}  # shapes normalised to tuples
    with pytest.raises(ValueError):
        InvalidReply("no-such-reason", "x")


def test_invalid_reply_pickles():
    e = pickle.loads(pickle.dumps(InvalidReply("shape", "key 'a' ...")))
    assert (e.reason, e.detail) == ("shape", "key 'a' ...")


# ---------------------------------------------------------------------------------------------------
# property: malformed replies never count, honest ones always do, the aggregate is the honest-only one
MSPEC = ReplySpec(shapes={"adapter": (6,), "head": (2, 3)}, fingerprint=FP, max_update_norm=10.0, max_num_examples=10**6)
MREF = {"adapter": np.zeros(6, np.float32), "head": np.zeros((2, 3), np.float32)}
unit = st.floats(-1, 1, width=32)
honest = st.builds(
    lambda a, h, n: ({"adapter": np.asarray(a, np.float32), "head": np.asarray(h, np.float32).reshape(2, 3)}, n, FP),
    st.lists(unit, min_size=6, max_size=6), st.lists(unit, min_size=6, max_size=6),
    st.one_of(st.integers(1, 1000), st.integers(1, 1000).map(np.int64), st.integers(1, 1000).map(float)))

key = st.sampled_from(sorted(MSPEC.shapes))
bad_n = st.one_of(st.integers(max_value=0), st.integers(10**6 + 1, 10**20), st.booleans(), st.none(), st.text(),
                  st.floats(allow_nan=True).filter(lambda x: not (x == x and float(x).is_integer() and x > 0)),
                  st.just(np.float64(np.nan)), st.just(np.bool_(True)), st.just([3]))


def _shape_other_than(expected):
    return st.lists(st.integers(0, 4), max_size=3).map(tuple).filter(lambda s: s != expected)


@st.composite
def malformed(draw):
    arrays, n, fp = draw(honest)
    arrays = dict(arrays)
    kind = draw(st.sampled_from(["missing", "extra", "shape", "dtype", "non-array", "non-finite", "fingerprint",
                                 "update-norm", "num-examples"]))
    k = draw(key)
    if kind == "missing":
        del arrays[k]
    elif kind == "extra":
        extra = draw(st.one_of(st.text(), st.integers()).filter(lambda t: t not in MSPEC.shapes))
        arrays[extra] = np.zeros(draw(_shape_other_than(None)), np.float32)
    elif kind == "shape":
        arrays[k] = np.zeros(draw(_shape_other_than(MSPEC.shapes[k])), np.float32)
    elif kind == "dtype":
        dt = draw(st.sampled_from(["float64", "float16", "int32", "int64", "uint8", "bool", "complex64", ">f4"]))
        arrays[k] = arrays[k].astype(dt)
    elif kind == "non-array":
        arrays[k] = draw(st.sampled_from([arrays[k].tolist(), torch.from_numpy(arrays[k]), None, "x"]))
    elif kind == "non-finite":
        a = arrays[k].copy()
        a.flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        arrays[k] = a
    elif kind == "fingerprint":
        fp = draw(st.one_of(st.none(), st.text().filter(lambda t: t != FP)))
    elif kind == "update-norm":
        a = arrays[k].copy()
        a.flat[draw(st.integers(0, a.size - 1))] = draw(st.floats(10.5, F32_MAX, width=32)) * draw(st.sampled_from([1, -1]))
        arrays[k] = a
    else:
        n = draw(bad_n)
    return arrays, n, fp


def _flat(arrays):
    return np.concatenate([arrays["adapter"].ravel(), arrays["head"].ravel()])


@settings(max_examples=200, deadline=None)
@given(st.lists(honest, min_size=1, max_size=5), st.lists(malformed(), max_size=6), st.randoms())
def test_malformed_replies_never_change_the_aggregate(good, bad, rnd):
    tagged = [(r, True) for r in good] + [(r, False) for r in bad]
    rnd.shuffle(tagged)
    acc, accepted_flags, accepted, reasons = robust.BlockWeightedMean(_flat(MREF)), [], [], []
    for node, ((arrays, n, fp), is_honest) in enumerate(tagged):
        try:
            w = check_reply(MSPEC, arrays, n, fp, MREF)
        except InvalidReply as e:
            w = None
            reasons.append(e.reason)
        accepted_flags.append(w is not None)
        if w is not None:
            assert w == int(n) and type(w) is int
            acc.add(_flat(arrays), w)
            accepted.append(_flat(arrays))
    assert accepted_flags == [h for _, h in tagged]  # every honest reply counts, no malformed one does
    assert len(reasons) == len(bad) and set(reasons) <= set(REASONS)
    # the honest replies alone, in the same order: bit-identical aggregate
    in_order = [r for r, h in tagged if h]
    expected = robust.weighted_mean([_flat(a) for a, _, _ in in_order], [int(n) for _, n, _ in in_order])
    assert acc.count == len(good)
    np.testing.assert_array_equal(acc.result(), expected)
    # and a robust rule over the accepted ones is the rule over the honest ones
    honest_vecs = [_flat(a) for a, _, _ in in_order]
    np.testing.assert_array_equal(robust_combine("median", accepted), robust_combine("median", honest_vecs))
    np.testing.assert_array_equal(robust_combine("trimmed-mean", accepted, 0.2), robust_combine("trimmed-mean", honest_vecs, 0.2))


# ---------------------------------------------------------------------------------------------------
# robust aggregation rules
@pytest.fixture(autouse=True, scope="module")
def inside_a_flower_run():
    """What a ServerApp's run sets: the robust rules build Flower Messages (module scope: hypothesis-safe)."""
    from client.flower_private import SUPERLINK_NODE_ID, TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def _former_rules(vs: list[np.ndarray], trim: float) -> tuple[np.ndarray, np.ndarray]:
    """fedsb's own median and trimmed mean, as they were before Flower's replaced them: float64, sorted, floor."""
    stack = np.stack([np.asarray(v, np.float64) for v in vs])
    t = int(np.floor(len(vs) * trim))
    return (np.median(stack, axis=0).astype(np.float32),
            np.sort(stack, axis=0)[t:len(vs) - t].mean(axis=0).astype(np.float32))


def test_flowers_median_and_trimmed_mean_give_the_former_results_bit_for_bit():
    rng = np.random.default_rng(0)
    for _ in range(200):
        k, d = int(rng.integers(1, 12)), int(rng.integers(1, 500))
        vs = [(rng.standard_normal(d) * 10.0 ** rng.uniform(-6, 3)).astype(np.float32) for _ in range(k)]
        trim = float(rng.choice([0.0, 0.1, 0.2, 0.25, 0.3, 0.49]))
        median, trimmed = _former_rules(vs, trim)
        np.testing.assert_array_equal(robust_combine("median", vs), median)
        np.testing.assert_array_equal(robust_combine("trimmed-mean", vs, trim), trimmed)


def test_robust_rules_resist_an_outlier_and_agree_on_equal_inputs():
    vs = [np.full(4, 1.0, np.float32)] * 4 + [np.full(4, 1e6, np.float32)]
    assert np.allclose(robust_combine("median", vs), 1.0)
    assert np.allclose(robust_combine("trimmed-mean", vs, 0.2), 1.0)
    assert not np.allclose(robust.weighted_mean(vs, [1] * 5), 1.0)  # the plain mean does not resist
    same = [np.arange(4, dtype=np.float32)] * 3
    for agg in (robust_combine("median", same), robust_combine("trimmed-mean", same, 0.1), robust_combine("trimmed-mean", same, 0.4),
                robust.weighted_mean(same, [1, 2, 3])):
        np.testing.assert_array_equal(agg, same[0])
        assert agg.dtype == np.float32


def _krum_by_definition(vs, f, m):
    """Blanchard et al.'s Krum (m = 1) and Multi-Krum: score = summed squared distance to the n-f-2 nearest
    others; the mean of the m lowest-scored vectors (ties: the first)."""
    x = np.stack(vs).astype(np.float64)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    k = max(1, len(vs) - f - 2)
    scores = [np.sort(np.delete(d[i], i))[:k].sum() for i in range(len(vs))]
    return x[np.argsort(scores, kind="stable")[:m]].mean(axis=0)


def test_flowers_krum_is_krum_by_its_definition_and_resists_attackers():
    rng = np.random.default_rng(1)
    for _ in range(100):
        n, d = int(rng.integers(3, 12)), int(rng.integers(1, 200))
        f = int(rng.integers(0, (n - 3) // 2 + 1))  # n >= 2f + 3, what the config demands
        m = int(rng.integers(1, n - f + 1))
        vs = [rng.standard_normal(d).astype(np.float32) for _ in range(n)]
        got = robust_combine("krum", vs, malicious_nodes=f, krum_select=m)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, _krum_by_definition(vs, f, m), rtol=1e-5, atol=1e-6)
    # two attackers among seven far off in different directions: Krum keeps an honest reply as it is
    honest = [np.full(5, 1.0, np.float32) + rng.normal(0, 0.01, 5).astype(np.float32) for _ in range(5)]
    attackers = [np.full(5, 1e4, np.float32), np.full(5, -1e4, np.float32)]
    picked = robust_combine("krum", honest[:3] + attackers + honest[3:], malicious_nodes=2)
    assert any(np.array_equal(picked, h) for h in honest)
    assert np.allclose(robust_combine("krum", honest + attackers, malicious_nodes=2, krum_select=3), 1.0, atol=0.02)


def test_krum_keys_are_checked_against_the_round_size():
    from fedsb.config import ConfigError, FedSBConfig

    for rc, key, words in (({"aggregation": "krum"}, "min-train-nodes", "2*0+3 = 3"),
                           ({"aggregation": "krum", "malicious-nodes": 2, "min-train-nodes": 6, "min-available-nodes": 6},
                            "min-train-nodes", "2*2+3 = 7"),
                           ({"aggregation": "krum", "min-train-nodes": 5, "min-available-nodes": 5, "malicious-nodes": 1,
                             "krum-select": 5}, "krum-select", "at most min-train-nodes - malicious-nodes = 4"),
                           ({"malicious-nodes": 1}, "malicious-nodes", "set aggregation='krum'"),
                           ({"aggregation": "median", "krum-select": 2}, "krum-select", "only aggregation='krum' uses")):
        with pytest.raises(ConfigError) as e:
            FedSBConfig.from_run_config(rc)
        assert e.value.key == key and words in str(e.value), e.value
    ok = FedSBConfig.from_run_config({"aggregation": "krum", "malicious-nodes": 1, "krum-select": 4,
                                      "min-train-nodes": 5, "min-available-nodes": 5})
    assert (ok.malicious_nodes, ok.krum_select) == (1, 4)


def test_robust_rule_details():
    vs = [np.array([1.0, 10.0], np.float32), np.array([2.0, 20.0], np.float32),
          np.array([3.0, 30.0], np.float32), np.array([4.0, -1e9], np.float32)]
    np.testing.assert_array_equal(robust_combine("median", vs), [2.5, 15.0])  # even count: mean of middle two
    np.testing.assert_array_equal(robust_combine("trimmed-mean", vs, 0.25), [2.5, 15.0])  # drops 1 low, 1 high per coord
    np.testing.assert_array_equal(robust_combine("trimmed-mean", vs, 0.2), robust.weighted_mean(vs, [1] * 4))  # floor(0.8)=0
    np.testing.assert_array_equal(robust.weighted_mean(vs[:2], [1, 3]), [1.75, 17.5])
    for bad in (-0.1, 0.5, 0.7, float("nan")):
        with pytest.raises(ValueError):
            robust_combine("trimmed-mean", vs, bad)
    for f in (lambda v: robust_combine("median", v), lambda v: robust_combine("trimmed-mean", v, 0.1), lambda v: robust.weighted_mean(v, [])):
        with pytest.raises(ValueError):
            f([])
    with pytest.raises(ValueError, match="shape"):  # never broadcast a (1,) vector into the rest
        robust_combine("median", [np.zeros(3, np.float32), np.zeros(1, np.float32)])
    acc = robust.BlockWeightedMean(np.zeros(3, np.float32))
    acc.add(np.zeros(3, np.float32), 1)
    with pytest.raises(ValueError, match="shape"):
        acc.add(np.zeros(1, np.float32), 1)
    for w in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            acc.add(np.zeros(3, np.float32), w)
    with pytest.raises(ValueError):
        robust.weighted_mean(vs, [1, 2])  # lengths differ
    with pytest.raises(ValueError):
        robust.BlockWeightedMean(np.zeros(3, np.float32)).result()


def test_running_mean_does_not_alias_its_input():
    v = np.ones(3, np.float32)
    acc = robust.BlockWeightedMean(np.zeros(3, np.float32))
    acc.add(v, 1.0)
    v[:] = 100
    np.testing.assert_array_equal(acc.result(), np.ones(3, np.float32))


vec_lists = st.integers(1, 8).flatmap(lambda d: st.lists(
    st.lists(st.floats(-1e6, 1e6, width=32), min_size=d, max_size=d).map(lambda x: np.asarray(x, np.float32)),
    min_size=1, max_size=7))


@settings(max_examples=100, deadline=None)
@given(vec_lists, st.data())
def test_aggregators_properties(vectors, data):
    weights = data.draw(st.lists(st.integers(1, 10**6), min_size=len(vectors), max_size=len(vectors)))
    acc = robust.BlockWeightedMean(np.zeros(vectors[0].shape, np.float32))
    for v, w in zip(vectors, weights):
        acc.add(v, w)
    wm = robust.weighted_mean(vectors, weights)
    np.testing.assert_array_equal(acc.result(), wm)  # streaming == batch, bit for bit
    assert acc.count == len(vectors) and np.all(acc.weight == sum(weights))
    stack = np.stack(vectors).astype(np.float64)
    np.testing.assert_allclose(wm, np.average(stack, axis=0, weights=weights).astype(np.float32), rtol=1e-6, atol=1e-6)
    lo, hi = stack.min(axis=0).astype(np.float32), stack.max(axis=0).astype(np.float32)
    perm = data.draw(st.permutations(range(len(vectors))))
    trim = data.draw(st.floats(0, 0.49))
    for rule in (lambda v: robust_combine("median", v), lambda v: robust_combine("trimmed-mean", v, trim)):
        out = rule(vectors)
        assert out.dtype == np.float32 and out.shape == vectors[0].shape
        assert np.all(lo <= out) and np.all(out <= hi)  # inside the per-coordinate range
        np.testing.assert_array_equal(out, rule([vectors[i] for i in perm]))  # order does not matter


@settings(max_examples=50, deadline=None)
@given(st.integers(3, 9), st.floats(-100, 100, width=32), st.floats(1e6, F32_MAX, width=32), st.integers(0, 8))
def test_a_single_outlier_among_equal_honest_vectors_is_ignored(k, honest_value, outlier, where):
    vs = [np.full(3, honest_value, np.float32) for _ in range(k)]
    vs.insert(where % (k + 1), np.full(3, outlier, np.float32))
    np.testing.assert_array_equal(robust_combine("median", vs), np.full(3, honest_value, np.float32))
    trim = 1.0 / (k + 1) + 1e-9  # drops exactly one value per side
    np.testing.assert_allclose(robust_combine("trimmed-mean", vs, trim), np.full(3, honest_value, np.float32), rtol=1e-6)
