"""Fed-SB's one-time cost made cheap (issue 14): 1-bit init upload with a weighted majority vote, the
server's own init data, int8/bfloat16 basis broadcast, a random basis sent as its seed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedsb.adapters.sb_init import SignVote, compute_bases, random_bases, update_approximation
from fedsb.aggregation.validation import InvalidReply, ReplySpec, check_reply
from fedsb.wire import (decode_basis, encode_basis, flatten, layer_list_fingerprint, pack_signs, round_basis,
                        unpack_signs)
from tests.conftest import tiny_run_config


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1001])
def test_sign_packing_round_trips(n):
    v = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    packed = pack_signs(v)
    assert packed.dtype == np.uint8 and packed.shape == ((n + 7) // 8,)
    assert np.array_equal(unpack_signs(packed, n), np.where(v > 0, 1, -1))
    with pytest.raises(ValueError):
        unpack_signs(packed[:-1], n)


def test_weighted_vote_is_the_sign_of_the_weighted_sign_sum():
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(500) for _ in range(5)]
    weights = [3, 1, 4, 1, 5]
    vote = SignVote(500)
    for g, w in zip(grads, weights):
        vote.add(unpack_signs(pack_signs(g), 500), w)
    expected = np.sign(sum(w * np.sign(g) for g, w in zip(grads, weights)))
    assert np.array_equal(np.sign(vote.result()), expected)
    tie = SignVote(2)
    tie.add(np.array([1, -1], np.int8), 2)
    tie.add(np.array([-1, 1], np.int8), 2)
    assert np.array_equal(np.sign(tie.result()), [0, 0])  # ties give 0


def test_identical_client_gradients_give_the_dense_basis_exactly():
    g = torch.from_numpy(np.random.default_rng(1).standard_normal((24, 40)))
    dense = update_approximation(3 * g, 3 * 16, 4, update="sign", svd="exact")  # 3 clients, 16 examples each
    vote = SignVote(g.numel())
    for _ in range(3):
        vote.add(unpack_signs(pack_signs(g.numpy().ravel()), g.numel()), 16)
    voted = update_approximation(torch.from_numpy(vote.result().reshape(24, 40)), 48, 4, update="sign", svd="exact")
    assert torch.equal(dense.B, voted.B) and torch.equal(dense.A, voted.A) and torch.equal(dense.R0, voted.R0)


def test_truncated_or_padded_packed_replies_are_rejected():
    n = 100
    spec = ReplySpec(shapes={"signs": ((n + 7) // 8,)}, dtype=np.uint8, fingerprint="layers")
    good = pack_signs(np.ones(n))
    assert check_reply(spec, {"signs": good}, 4, "layers") == 4
    for bad, reason in ((good[:-1], "shape"), (np.concatenate([good, good[:1]]), "shape"),
                        (good.astype(np.int16), "dtype")):
        with pytest.raises(InvalidReply) as e:
            check_reply(spec, {"signs": bad}, 4, "layers")
        assert e.value.reason == reason
    with pytest.raises(InvalidReply) as e:  # computed over another list of layers
        check_reply(spec, {"signs": good}, 4, layer_list_fingerprint({"other": (3, 4)}))
    assert e.value.reason == "fingerprint"


@pytest.mark.parametrize("dtype, ratio", [("float32", 1.0), ("bfloat16", 0.5), ("int8", 0.30),
                                          ("int4", 0.17)])
def test_basis_codecs_decode_to_what_the_server_holds(dtype, ratio):
    bases = random_bases({"a": (64, 96), "b": (32, 48)}, 8, seed=3)
    rounded = {}
    for n, b in bases.items():
        rounded[n + ".B"], rounded[n + ".A"] = round_basis(b.B, dtype), round_basis(b.A, dtype)
    again = {k: round_basis(v, dtype) for k, v in rounded.items()}
    assert all(torch.equal(rounded[k], again[k]) for k in rounded)  # rounding is idempotent: re-encodable
    arrays = encode_basis(rounded, dtype)
    assert np.array_equal(decode_basis(arrays), flatten(rounded))  # bit for bit what the server uses
    nbytes = sum(a.nbytes for a in arrays.values())
    assert nbytes <= ratio * 4 * sum(t.numel() for t in rounded.values())
    err = max(float((rounded[n + ".B"] - bases[n].B).abs().max()) for n in bases)
    assert err <= {"float32": 0.0, "bfloat16": 4e-3, "int8": 2e-2, "int4": 0.1}[dtype]


def test_int4_basis_packs_two_codes_per_byte_and_refuses_a_short_one():
    bases = random_bases({"a": (33, 7)}, 3, seed=1)  # an odd number of codes: 99 + 21
    t = {"a.B": round_basis(bases["a"].B, "int4"), "a.A": round_basis(bases["a"].A, "int4")}
    arrays = encode_basis(t, "int4")
    assert arrays["basis_i4"].dtype == np.uint8 and arrays["basis_i4"].size == (33 * 3 + 3 * 7 + 1) // 2
    assert np.array_equal(decode_basis(arrays), flatten(t))
    with pytest.raises(ValueError, match="int4 basis"):
        decode_basis(dict(arrays, basis_i4=arrays["basis_i4"][:-1]))


def test_regenerated_random_basis_matches_the_servers_bit_for_bit(tiny_bert, sentiment_csv, tmp_path):
    # the server's own path (targets in config order) against a node's (modules in model order): the
    # tiny model's targets are not in module order, which once gave every layer another layer's seed
    from fedsb.config import FedSBConfig
    from fedsb.methods.fed_sb import BasisSeedMismatch, regenerate_random_basis
    from fedsb.tasks import get_task
    from server.strategy import FedSB

    for dtype in ("float32", "int8"):
        cfg = FedSBConfig.from_run_config(tiny_run_config(tiny_bert, sentiment_csv, tmp_path / dtype, **{
            "init-basis": "random", "basis-dtype": dtype}))
        server = FedSB(cfg)
        assert list(server.task.layer_names) != [n for n, _ in server.model.named_modules()
                                                 if n in set(server.task.layer_names)]
        server.basis.initialize([])
        fp = server.basis.fingerprint_for(-1)
        vec = regenerate_random_basis(get_task(cfg), cfg.rank, cfg.seed, fp)
        assert np.array_equal(vec, server.state.basis)
        with pytest.raises(BasisSeedMismatch):
            regenerate_random_basis(get_task(cfg), cfg.rank, cfg.seed + 1, fp)


def _run(tiny_bert, sentiment_csv, out, n=3, **extra):
    from safetensors.torch import load_file

    from lab.inprocess_grid import run_inprocess

    run = run_inprocess(tiny_run_config(tiny_bert, sentiment_csv, out, **extra), n)
    t = load_file(str(run / "adapter" / "fedsb_adapter.safetensors"))
    entries = sum(t[k].shape[0] * t[k[:-len(".sb_B")] + ".sb_A"].shape[1] for k in t if k.endswith(".sb_B"))
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()], \
        json.loads((run / "summary.json").read_text()), entries


def test_sign_upload_run_is_32x_smaller_and_learns(tiny_bert, sentiment_csv, tmp_path):
    recs, s, entries = _run(tiny_bert, sentiment_csv, tmp_path / "sign", **{"basis-dtype": "int4"})
    init = recs[0]
    assert init["phase"] == "init" and init["init_upload"] == "sign" and init["basis_dtype"] == "int4"
    assert init["accepted"] == 2 and init["rejected"] == []  # init-fraction 0.5 (the default): 2 of 3 nodes asked
    # 1 bit per gradient entry (a dense float32 upload is 32), plus framing and the metrics
    assert 2 * entries / 8 <= s["bytes_init_total"] <= 2 * (entries / 8 + 1024)
    assert s["final_accuracy"] >= 0.8
    # what an asked client pays: its own init upload (the total over the 2 asked) and one basis download (3 sent)
    assert s["bytes_one_time_per_client"] == pytest.approx(s["bytes_init_total"] / 2 + s["bytes_basis_total"] / 3)


def test_server_source_sends_no_init_query_and_spends_no_privacy(tiny_bert, sentiment_csv, tmp_path):
    recs, s, _ = _run(tiny_bert, sentiment_csv, tmp_path / "server", **{
        "init-source": "server", "init-server-samples": 64, "dp": True, "target-epsilon": 8.0,
        "num-server-rounds": 1, "local-steps": 5})
    init = recs[0]
    assert init["phase"] == "init" and init["init_source"] == "server" and init["clients"] == 0
    assert init["bytes_up"] == 0 and s["bytes_init_total"] == 0 and init["examples"] == 64
    # the nodes received only the hello before round 1: no init query was sent
    assert init["bytes_down"] == 0
    assert all(h[2] != 1 for h in s["dp_history"])  # only local DP-SGD steps, no init step
    assert sum(h[2] for h in s["dp_history"]) == 5


def test_random_basis_under_dp_travels_as_its_seed(tiny_bert, sentiment_csv, tmp_path):
    # Each node regenerates the basis from the seed (its fingerprint matches the server's), also when
    # DP-SGD wraps its model: no node asks for the matrices, and the one-time download is the seed alone.
    recs, s, _ = _run(tiny_bert, sentiment_csv, tmp_path / "dp-random", **{
        "init-basis": "random", "basis-dtype": "int8", "dp": True, "target-epsilon": 8.0,
        "num-server-rounds": 2, "local-steps": 2})
    trains = [r for r in recs if r.get("phase") == "train"]
    assert trains and all(r["basis_resent"] == 0 for r in trains)
    assert s["bytes_basis_total"] <= 3 * 512
