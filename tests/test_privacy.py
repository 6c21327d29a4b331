"""DP-SGD on clients: clipping, noise scale, equivalence without noise, accounting, a private run."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fedsb import adapters
from fedsb.privacy import dp as privacy
from fedsb.tasks.data import pad_collate
from fedsb.adapters.sb_init import accumulate_gradients
from fedsb.methods import make_method
from fedsb.tasks.models import load_base_model
from fedsb.tasks.seq_cls import seq_cls_per_example_loss
from fedsb.tasks.training import train_steps
from lab.tiny import set_random_bases
from tests.conftest import tiny_run_config


def _dataset(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        ids = torch.randint(1000, 3000, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g)
        items.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                      "labels": torch.randint(0, 2, (), generator=g)})
    return items


def _sb_model(tiny_bert):
    model = load_base_model(str(tiny_bert), "seq-cls", 2, 0)
    layers = make_method("fed-sb", 4, 1.0, 8.0, 0).build(model, adapters.find_targets(model, None))
    set_random_bases(layers, 4, seed=1)
    return model


def test_init_gradient_clipping_and_equivalence(tiny_bert):
    model = load_base_model(str(tiny_bert), "seq-cls", 2, 0)
    names = adapters.find_targets(model, ["query", "value"])
    batch = pad_collate(0)(_dataset(6))
    plain, n = accumulate_gradients(model, names, [batch], seq_cls_per_example_loss)
    g = torch.Generator().manual_seed(0)
    huge, n2 = privacy.private_gradient_sum(model, names, [batch], max_grad_norm=1e6, noise_multiplier=0.0,
                                            loss_fn=seq_cls_per_example_loss, generator=g)
    assert n == n2 == 6
    for k in names:  # no noise, no clipping: the non-private sum
        assert torch.allclose(plain[k], huge[k], atol=1e-5)
    C = 1e-4  # far below every per-example norm: each example contributes exactly norm C
    clipped, _ = privacy.private_gradient_sum(model, names, [batch], max_grad_norm=C, noise_multiplier=0.0,
                                              loss_fn=seq_cls_per_example_loss, generator=g)
    total = torch.sqrt(sum(v.pow(2).sum() for v in clipped.values()))
    assert float(total) <= 6 * C * (1 + 1e-4)
    assert float(total) > 0.5 * C


def test_noise_has_std_sigma_times_C(tiny_bert):
    model = load_base_model(str(tiny_bert), "seq-cls", 2, 0)
    names = adapters.find_targets(model, ["query", "key", "value"])
    sigma, C = 1.7, 0.5
    noise, count = privacy.private_gradient_sum(model, names, [], max_grad_norm=C, noise_multiplier=sigma,
                                                loss_fn=seq_cls_per_example_loss, generator=torch.Generator().manual_seed(0))
    x = torch.cat([v.flatten() for v in noise.values()])
    assert count == 0 and x.numel() > 5000
    assert abs(float(x.std()) / (sigma * C) - 1) < 0.03
    assert abs(float(x.mean())) < 0.05 * sigma * C


def test_dp_step_without_noise_and_huge_clip_equals_plain_step(tiny_bert):
    ds = _dataset(8)
    model = _sb_model(tiny_bert)
    for mod in model.modules():  # dropout would draw different masks in the two paths
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    dp_model, plain_model = copy.deepcopy(model), copy.deepcopy(model)
    # batch_size = n: Poisson rate 1, every example in the one step
    res = privacy.private_train(dp_model, ds, pad_collate(0), steps=1, batch_size=8, lr=0.01, weight_decay=0.0,
                                noise_multiplier=0.0, max_grad_norm=1e6, history=[], accountant="rdp",
                                grad_sample_mode="hooks", loss_fn=seq_cls_per_example_loss, sampling_generator=torch.Generator().manual_seed(0), delta=1e-5)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=pad_collate(0))
    train_steps(plain_model, loader, 1, 0.01, seq_cls_per_example_loss, progress=False)
    trained = [(n, p, q) for (n, p), (_, q) in zip(dp_model.named_parameters(), plain_model.named_parameters())
               if p.requires_grad]
    assert trained and all(torch.allclose(p, q, atol=1e-5) for _, p, q in trained)
    assert not torch.allclose(trained[0][1], dict(model.named_parameters())[trained[0][0]])  # it did train
    assert res.history == [(0.0, 1.0, 1)]
    assert not any(hasattr(p, "grad_sample") for _, p, _ in trained)  # Opacus detached: a plain model again


def test_empty_poisson_batches_are_noise_only_steps_and_history_accumulates(tiny_bert):
    model = _sb_model(tiny_bert)
    ds = _dataset(50)
    r1 = privacy.private_train(model, ds, pad_collate(0), steps=20, batch_size=1, lr=0.01, weight_decay=0.0,
                               noise_multiplier=1.0, max_grad_norm=1.0, history=[], accountant="prv",
                               grad_sample_mode="hooks", loss_fn=seq_cls_per_example_loss, sampling_generator=torch.Generator().manual_seed(3), delta=1e-4)
    assert r1.empty_steps > 0 and r1.history == [(1.0, 0.02, 20)]
    r2 = privacy.private_train(model, ds, pad_collate(0), steps=5, batch_size=1, lr=0.01, weight_decay=0.0,
                               noise_multiplier=1.0, max_grad_norm=1.0, history=r1.history, accountant="prv",
                               grad_sample_mode="hooks", loss_fn=seq_cls_per_example_loss, sampling_generator=torch.Generator().manual_seed(4), delta=1e-4)
    assert r2.history == [(1.0, 0.02, 25)] and r2.epsilon > r1.epsilon


def test_poisson_masks_are_secret_unless_a_generator_is_given(tiny_bert):
    """The accountant's amplification by subsampling needs masks the server cannot reproduce from the
    run's seeds: by default two identical calls sample differently; with one explicit generator seed they
    agree (so tests stay deterministic). No noise and a huge clip, so only the masks differ."""
    ds = _dataset(16)
    model = _sb_model(tiny_bert)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0

    def run(gen):
        m = copy.deepcopy(model)
        privacy.private_train(m, ds, pad_collate(0), steps=4, batch_size=8, lr=0.01, weight_decay=0.0,
                              noise_multiplier=0.0, max_grad_norm=1e6, history=[], accountant="rdp",
                              grad_sample_mode="hooks", loss_fn=seq_cls_per_example_loss, delta=1e-5,
                              sampling_generator=gen)
        return torch.cat([p.detach().flatten() for p in m.parameters() if p.requires_grad])

    assert torch.equal(run(torch.Generator().manual_seed(5)), run(torch.Generator().manual_seed(5)))
    assert not torch.allclose(run(None), run(None))


def test_accounting_matches_opacus_and_calibration_meets_target():
    from opacus.accountants import RDPAccountant

    phases = [(0.5, 1), (0.05, 200)]
    sigma = privacy.calibrate_noise(3.0, 1e-5, phases, "rdp")
    hist = [(sigma, q, s) for q, s in phases]
    eps = privacy.epsilon_from_history(hist, 1e-5, "rdp")
    acc = RDPAccountant()
    for q, s in phases:
        for _ in range(s):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    assert eps == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert 0.97 * 3.0 <= eps <= 3.0
    assert privacy.epsilon_from_history([(sigma * 0.9, q, s) for q, s in phases], 1e-5, "rdp") > 3.0


def test_calibration_is_computed_once_per_question(monkeypatch):
    """A client asks for the same σ every round: the bisection (dozens of accountant calls) runs once."""
    calls = []
    real = privacy.epsilon_from_history
    monkeypatch.setattr(privacy, "epsilon_from_history", lambda *a, **k: calls.append(1) or real(*a, **k))
    phases = [(0.25, 1), (0.03, 150)]
    first = privacy.calibrate_noise(2.5, 1e-5, phases, "rdp")
    n = len(calls)
    assert n > 3  # the bisection ran
    assert privacy.calibrate_noise(2.5, 1e-5, list(phases), "rdp") == first and len(calls) == n  # kept
    assert privacy.calibrate_noise(2.0, 1e-5, phases, "rdp") > first and len(calls) > n  # another question


def test_private_simulation_accounts_the_init_step(tiny_bert, sentiment_csv, tmp_path):
    from lab.inprocess_grid import run_inprocess

    run = run_inprocess(tiny_run_config(tiny_bert, sentiment_csv, tmp_path / "dp", **{
        "dp": True, "target-epsilon": 8.0, "max-grad-norm": 1.0, "num-server-rounds": 2, "local-steps": 5}), 3)
    s = json.loads((run / "summary.json").read_text())
    assert s["dp"] and s["epsilon"] <= 8.0 and s["delta"] < 1 / 160
    first = s["dp_history"][0]
    assert first[2] == 1 and first[1] == pytest.approx(32 / 160, rel=0.05)  # the init step: 32 of ~160 examples
    rebuilt = privacy.epsilon_from_history([tuple(h) for h in s["dp_history"]], s["delta"], s["accountant"])
    assert rebuilt == pytest.approx(s["epsilon"], rel=1e-9)
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["epsilon"] is not None for r in recs if r["phase"] == "train")
    # the loss on raw local batches is not privatized, so no client uploads it under dp
    assert all(r["loss"] is None for r in recs if r["phase"] == "train")


def test_random_basis_spends_no_privacy_and_uploads_no_init_gradient(tiny_bert, sentiment_csv, tmp_path):
    from client.dp import noise_multiplier
    from fedsb.config import FedSBConfig
    from lab.inprocess_grid import run_inprocess

    base = {"dp": True, "target-epsilon": 3.0, "num-server-rounds": 2, "local-steps": 5}
    grad_cfg = FedSBConfig.from_run_config(base)
    rand_cfg = FedSBConfig.from_run_config(dict(base, **{"init-basis": "random"}))
    # no init step in the horizon: the same target is met with less noise per local step
    assert noise_multiplier(rand_cfg, 500, 1e-4) < noise_multiplier(grad_cfg, 500, 1e-4)
    run = run_inprocess(tiny_run_config(tiny_bert, sentiment_csv, tmp_path / "rand", **dict(base, **{"init-basis": "random"})), 3)
    s = json.loads((run / "summary.json").read_text())
    assert s["epsilon"] <= 3.0 and s["bytes_init_total"] == 0
    assert s["dp_history"] and all(h[2] != 1 for h in s["dp_history"])  # only local DP-SGD steps, no init entry
    init = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()][0]
    assert init["phase"] == "init" and init["bytes_up"] == 0


def test_dp_refuses_federated_evaluation_on_private_data():
    from fedsb.config import ConfigError, FedSBConfig

    with pytest.raises(ConfigError, match="federated-evaluate"):
        FedSBConfig.from_run_config({"dp": True, "federated-evaluate": True})
    assert FedSBConfig.from_run_config({"dp": True}).federated_evaluate is False


def test_secagg_rounds_are_accounted_under_dp(tiny_bert, sentiment_csv, tmp_path):
    """dp + secagg: every secure round's DP-SGD steps reach the server's accountant (ε grows round by round
    and the summary's history holds the init step and both rounds), so a node's budget is never reset."""
    from lab.inprocess_grid import run_inprocess

    run = run_inprocess(tiny_run_config(tiny_bert, sentiment_csv, tmp_path / "dp-secagg", **{
        "dp": True, "secagg": True, "target-epsilon": 8.0, "num-server-rounds": 2, "local-steps": 5}), 3)
    s = json.loads((run / "summary.json").read_text())
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    eps = [r["epsilon"] for r in recs if r["phase"] == "train"]
    assert all(r["secagg"] and r["updated"] for r in recs if r["phase"] == "train")
    assert len(eps) == 2 and 0 < eps[0] < eps[1] <= 8.0
    steps = sum(h[2] for h in s["dp_history"])
    assert steps == 1 + 2 * 5  # the init step, then 5 local steps in each of the 2 rounds
    assert s["epsilon"] == pytest.approx(eps[-1], rel=1e-9)
