"""Reply validation and aggregation rules: every kind of bad reply is refused, and random malformed
replies mixed into honest ones never change the aggregate (hypothesis)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsb import robust
from fedsb.validation import REASONS, InvalidReply, ReplySpec, check_reply

SPEC = ReplySpec(shapes={"adapter": (6,)}, fingerprint="f" * 32, max_update_norm=10.0)
REF = {"adapter": np.zeros(6, np.float32)}
GOOD = {"adapter": np.arange(6, dtype=np.float32) / 10}


@pytest.mark.parametrize("arrays, n, fp, reason", [
    ({}, 5, "f" * 32, "missing-key"),
    ({**GOOD, "x": np.zeros(1, np.float32)}, 5, "f" * 32, "extra-key"),
    ({"adapter": np.zeros(5, np.float32)}, 5, "f" * 32, "shape"),
    ({"adapter": np.zeros(6, np.float64)}, 5, "f" * 32, "dtype"),
    ({"adapter": np.array([0, 1, np.nan, 0, 0, 0], np.float32)}, 5, "f" * 32, "non-finite"),
    ({"adapter": np.array([0, 1, np.inf, 0, 0, 0], np.float32)}, 5, "f" * 32, "non-finite"),
    (GOOD, 5, "e" * 32, "fingerprint"),
    ({"adapter": np.full(6, 100, np.float32)}, 5, "f" * 32, "update-norm"),
    (GOOD, 0, "f" * 32, "num-examples"),
    (GOOD, -3, "f" * 32, "num-examples"),
    (GOOD, 2.5, "f" * 32, "num-examples"),
    (GOOD, True, "f" * 32, "num-examples"),
    (GOOD, "7", "f" * 32, "num-examples"),
    (GOOD, float("nan"), "f" * 32, "num-examples"),
])
def test_each_bad_reply_is_refused_with_its_reason(arrays, n, fp, reason):
    with pytest.raises(InvalidReply) as e:
        check_reply(SPEC, arrays, n, fp, REF)
    assert e.value.reason == reason and e.value.reason in REASONS


def test_honest_reply_passes():
    assert check_reply(SPEC, GOOD, 7, "f" * 32, REF) == 7
    assert check_reply(SPEC, GOOD, 7.0, "f" * 32, REF) == 7


bad_array = st.one_of(
    st.just(np.zeros(5, np.float32)), st.just(np.zeros(6, np.float64)), st.just(np.zeros((2, 3), np.float32)),
    st.builds(lambda i, v: np.where(np.arange(6) == i, v, 0).astype(np.float32), st.integers(0, 5),
              st.sampled_from([np.nan, np.inf, -np.inf, 1e6])),
)
malformed = st.one_of(
    st.builds(lambda a: ({"adapter": a}, 3, "f" * 32), bad_array),
    st.builds(lambda n: (GOOD, n, "f" * 32), st.one_of(st.integers(max_value=0), st.floats(allow_nan=True).filter(
        lambda x: not (x == x and float(x).is_integer() and x > 0)), st.booleans(), st.text())),
    st.builds(lambda fp: (GOOD, 3, fp), st.text().filter(lambda t: t != "f" * 32)),
    st.builds(lambda k: ({**GOOD, k: np.zeros(1, np.float32)}, 3, "f" * 32), st.text().filter(lambda t: t != "adapter")),
)
honest = st.builds(lambda v, n: ({"adapter": np.asarray(v, np.float32)}, n, "f" * 32),
                   st.lists(st.floats(-1, 1, width=32), min_size=6, max_size=6), st.integers(1, 1000))


@settings(max_examples=150, deadline=None)
@given(st.lists(honest, min_size=1, max_size=5), st.lists(malformed, max_size=5), st.randoms())
def test_malformed_replies_never_change_the_aggregate(good, bad, rnd):
    replies = good + bad
    rnd.shuffle(replies)
    acc = robust.RunningWeightedMean()
    for arrays, n, fp in replies:
        try:
            w = check_reply(SPEC, arrays, n, fp, REF)
        except InvalidReply:
            continue
        acc.add(arrays["adapter"], w)
    # the honest replies alone, in the same order: bit-identical aggregate
    honest_ids = {id(r) for r in good}
    in_order = [r for r in replies if id(r) in honest_ids]
    expected = robust.weighted_mean([a["adapter"] for a, _, _ in in_order], [n for _, n, _ in in_order])
    assert acc.count == len(good)
    np.testing.assert_array_equal(acc.result(), expected)


def test_robust_rules_resist_an_outlier_and_agree_on_equal_inputs():
    vs = [np.full(4, 1.0, np.float32)] * 4 + [np.full(4, 1e6, np.float32)]
    assert np.allclose(robust.coordinate_median(vs), 1.0)
    assert np.allclose(robust.trimmed_mean(vs, 0.2), 1.0)
    same = [np.arange(4, dtype=np.float32)] * 3
    for agg in (robust.coordinate_median(same), robust.trimmed_mean(same, 0.1), robust.weighted_mean(same, [1, 2, 3])):
        assert np.allclose(agg, same[0])


def test_library_never_imports_flower():
    mods = ["adapters", "init", "methods", "robust", "validation", "privacy", "data", "models", "export", "config",
            "checkpoint", "records", "task", "training", "causal", "causal_task", "certs", "deploy", "basis_cache"]
    code = "import sys\n" + "".join(f"import fedsb.{m}\n" for m in mods) + "print('flwr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
