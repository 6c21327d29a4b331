"""The maths Fed-SB rests on: exact aggregation, optimal init, gradient equivalence, merge, PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedsb import adapters
from fedsb.adapters import SBLinear
from fedsb.adapters.sb_init import accumulate_gradients, random_bases, truncated_svd, update_approximation
from fedsb.wire import basis_fingerprint, flatten, unflatten_into
from lab.tiny import set_random_bases



@pytest.fixture(autouse=True)
def float64_default():
    """The maths is checked in float64; the default dtype is restored after each test, so it never leaks
    into the tests collected after this file."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _sb(base: nn.Module, r: int, s: float, seed: int) -> SBLinear:
    layer = SBLinear(base, r, s)
    set_random_bases({"layer": layer}, r, seed)
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_weighted_mean_of_clients_equals_model_with_mean_R(kind):
    torch.manual_seed(0)
    m, n, r, s = 12, 9, 4, 0.7
    base = nn.Linear(n, m) if kind == "linear" else Conv1D(m, n)
    x = torch.randn(5, n)
    clients, weights = [], torch.tensor([3.0, 1.0, 6.0])
    for i in range(3):
        layer = _sb(copy.deepcopy(base), r, s, seed=1)  # same B, A for everyone
        with torch.no_grad():
            layer.sb_R.weight.copy_(torch.randn(r, r))
        clients.append(layer)
    w = weights / weights.sum()
    # mean of full weights W0 + s·B·R_i·A ...
    mean_out = sum(wi * c(x) for wi, c in zip(w, clients))
    mean_delta = sum(wi * c.delta_weight() for wi, c in zip(w, clients))
    # ... equals the layer whose R is the weighted mean of the R_i
    agg = _sb(copy.deepcopy(base), r, s, seed=1)
    with torch.no_grad():
        agg.sb_R.weight.copy_(sum(wi * c.sb_R.weight for wi, c in zip(w, clients)))
    assert torch.allclose(agg(x), mean_out, atol=1e-6, rtol=0)
    assert torch.allclose(agg.delta_weight(), mean_delta, atol=1e-6, rtol=0)
    # and the adapter really is W0 + s·B·R·A (Conv1D stores W transposed)
    W0 = adapters.weight_as_mn(agg.base_layer)
    expected = x @ (W0 + agg.delta_weight()).t() + agg.base_layer.bias
    assert torch.allclose(agg(x), expected, atol=1e-10)


def test_init_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    G = torch.randn(40, 30)
    r, lr, s = 5, 1e-2, 2.0
    basis = update_approximation(G, 1, r, scale=s, update="sign", lr=lr, svd="exact")
    B, A, R0 = basis.B.double(), basis.A.double(), basis.R0.double()
    dW = -lr * torch.sign(G)
    approx = s * B @ R0 @ A
    tail = torch.linalg.svdvals(dW)[r:]
    # Eckart–Young: the Frobenius error equals the norm of the tail singular values
    assert torch.allclose(torch.linalg.norm(dW - approx), torch.linalg.norm(tail), rtol=1e-5)
    assert torch.allclose(B.t() @ B, torch.eye(r), atol=1e-5)
    assert torch.allclose(A @ A.t(), torch.eye(r), atol=1e-5)
    # grad update: same, on -lr * mean gradient
    g = update_approximation(G * 4, 4, r, update="grad", lr=lr, svd="exact")
    tail_g = torch.linalg.svdvals(-lr * G)[r:]
    assert torch.allclose(torch.linalg.norm(-lr * G - g.B.double() @ g.R0.double() @ g.A.double()),
                          torch.linalg.norm(tail_g), rtol=1e-5)


def test_random_bases_are_orthonormal_seeded_and_start_at_W0():
    shapes = {"a": (12, 9), "b": (7, 10)}
    one, again, other = random_bases(shapes, 3, seed=1), random_bases(shapes, 3, seed=1), random_bases(shapes, 3, seed=2)
    for name, (m, n) in shapes.items():
        B, A, R0 = one[name].B.double(), one[name].A.double(), one[name].R0
        assert B.shape == (m, 3) and A.shape == (3, n)
        assert torch.allclose(B.t() @ B, torch.eye(3), atol=1e-6) and torch.allclose(A @ A.t(), torch.eye(3), atol=1e-6)
        assert torch.count_nonzero(R0) == 0  # s·B·R0·A = 0: the adapted model starts as the base model
        assert torch.equal(one[name].B, again[name].B) and torch.equal(one[name].A, again[name].A)
        assert not torch.allclose(one[name].B, other[name].B)
    assert not torch.allclose(one["a"].B[:7], one["b"].B)  # layers draw different bases


def test_randomized_svd_agrees_with_exact():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(300, 300))
    V, _ = torch.linalg.qr(torch.randn(200, 200))
    S = torch.cat([torch.linspace(10, 5, 8), torch.full((192,), 0.01)])
    M = U[:, :200] @ torch.diag(S) @ V.t()
    Ue, Se, Ve = truncated_svd(M, 8, "exact")
    Ur, Sr, Vr = truncated_svd(M, 8, "randomized", seed=3)
    assert torch.allclose(Se, Sr, rtol=1e-6)
    # same subspaces (singular vectors are defined up to sign)
    assert torch.allclose((Ue @ Ue.t()), (Ur @ Ur.t()), atol=1e-6)
    assert torch.allclose((Ve.t() @ Ve), (Vr.t() @ Vr), atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_gradient_of_R_is_projected_weight_gradient(kind):
    torch.manual_seed(0)
    m, n, r, s = 10, 8, 3, 1.5
    base = nn.Linear(n, m) if kind == "linear" else Conv1D(m, n)
    layer = _sb(base, r, s, seed=2)
    x, t = torch.randn(6, n), torch.randn(6, m)
    loss = ((layer(x) - t) ** 2).sum()
    loss.backward()
    dR = layer.sb_R.weight.grad.clone()
    # gradient w.r.t. the full weight W at the same point
    W = (adapters.weight_as_mn(layer.base_layer) + layer.delta_weight()).detach().requires_grad_(True)
    ((x @ W.t() + layer.base_layer.bias - t) ** 2).sum().backward()
    expected = s * layer.sb_B.t() @ W.grad @ layer.sb_A.t()
    assert torch.allclose(dR, expected, atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fused_path_equals_plain_path(kind):
    """SBLinear's one-matmul training path (hand-written backward) gives the same output, input
    gradient and R gradient as base + adapter computed module by module; a hook on sb_R (what Opacus
    registers) makes the layer take the plain path, so the hook sees R's own forward."""
    torch.manual_seed(0)
    m, n, r, s = 20, 16, 4, 0.7
    base = nn.Linear(n, m) if kind == "linear" else Conv1D(m, n)
    fused = _sb(base, r, s, seed=5)
    plain = copy.deepcopy(fused)
    seen = []
    plain.sb_R.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    x1 = torch.randn(3, 7, n, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    assert fused._can_fuse(x1) and not plain._can_fuse(x2)
    y1, y2 = fused(x1), plain(x2)
    assert seen == [(3, 7, r)]
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    assert torch.allclose(y1, y2, atol=1e-10)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-10)
    assert torch.allclose(fused.sb_R.weight.grad, plain.sb_R.weight.grad, atol=1e-10)
    assert fused.sb_B.grad is None and fused.base_layer.weight.grad is None
    # a handful of tokens (generation) takes the plain path: building W0 + s·B·R·A would cost more
    assert not fused._can_fuse(torch.randn(1, n))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge_round_trip(kind):
    torch.manual_seed(0)
    base = nn.Linear(7, 9) if kind == "linear" else Conv1D(9, 7)
    layer = _sb(base, 3, 1.0, seed=4)
    x = torch.randn(4, 7)
    W_before = layer.base_layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert layer.merged and torch.allclose(layer(x), y, atol=1e-10)
    assert not torch.allclose(layer.base_layer.weight, W_before)
    layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, W_before, atol=1e-12)
    assert torch.allclose(layer(x), y, atol=1e-10)


def test_accumulated_gradient_is_sum_over_examples(tiny_bert):
    torch.set_default_dtype(torch.float32)  # a real model's dtype; the fixture restores the default after
    from fedsb.tasks.models import load_base_model
    from fedsb.tasks.seq_cls import seq_cls_per_example_loss

    model = load_base_model(str(tiny_bert), "seq-cls", 2, 0)
    names = adapters.find_targets(model, ["query"])
    ids = torch.randint(5, 1000, (4, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1, 0])}
    one_pass, n = accumulate_gradients(model, names, [batch], seq_cls_per_example_loss)
    singles = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(4)]
    per_example, n2 = accumulate_gradients(model, names, singles, seq_cls_per_example_loss)
    assert n == n2 == 4
    for k in names:
        assert torch.allclose(one_pass[k], per_example[k], atol=1e-5)
        assert one_pass[k].abs().sum() > 0
    assert not any(p.requires_grad for p in model.parameters())  # requires_grad restored after the pass


def test_flatten_round_trip_and_fingerprint_sensitivity():
    t = {"a": torch.randn(3, 3), "b": torch.randn(4)}
    vec = flatten(t)
    z = {"a": torch.zeros(3, 3), "b": torch.zeros(4)}
    unflatten_into(z, vec)
    assert all(torch.allclose(t[k].float(), z[k].float()) for k in t)
    with pytest.raises(ValueError, match="expected"):
        unflatten_into(z, vec[:-1])
    B, A = torch.randn(5, 2), torch.randn(2, 5)
    fp = basis_fingerprint("m", 2, {"l": (B, A)})
    B2 = B.clone()
    B2[0, 0] = torch.nextafter(B2[0, 0], torch.tensor(10.0, dtype=B2.dtype))
    assert fp != basis_fingerprint("m", 2, {"l": (B2, A)})
    assert fp == basis_fingerprint("m", 2, {"l": (B.clone(), A.clone())})


def test_unknown_target_lists_linear_layers(tiny_bert):
    from fedsb.tasks.models import load_base_model

    model = load_base_model(str(tiny_bert), "seq-cls", 2, 0)
    with pytest.raises(adapters.TargetError) as e:
        adapters.find_targets(model, ["q_proj"])
    assert "q_proj" in str(e.value) and "query" in str(e.value) and "intermediate.dense" in str(e.value)
    assert set(adapters.find_targets(model, None)) >= {"bert.encoder.layer.0.attention.self.query"}
    assert not any(n.startswith("classifier") for n in adapters.find_targets(model, None))


def test_linear_schedule_matches_transformers_over_all_rounds():
    """lr-schedule=linear laid over rounds x local steps equals transformers' linear warm-up/decay schedule."""
    from transformers import get_linear_schedule_with_warmup

    from fedsb.tasks.training import scheduled_lrs

    rounds, steps, lr = 4, 5, 0.01
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=int(0.25 * rounds * steps), num_training_steps=rounds * steps)
    want = []
    for _ in range(rounds * steps):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    got = [x for rnd in range(1, rounds + 1) for x in scheduled_lrs(lr, "linear", 0.25, rnd, rounds, steps)]
    assert got == pytest.approx(want)
    assert scheduled_lrs(lr, "constant", 0.25, 3, rounds, steps) == [lr] * steps


def test_train_steps_applies_one_rate_per_step():
    """A zero rate leaves the weights where they are; the same steps with a positive rate move them."""
    from fedsb.tasks.training import train_steps

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    data = [{"x": torch.randn(8, 4), "labels": torch.randint(0, 2, (8,))}]
    loss = lambda m, b: torch.nn.functional.cross_entropy(m(b["x"]), b["labels"], reduction="none")  # noqa: E731
    before = model.weight.detach().clone()
    train_steps(model, data, 3, [0.0, 0.0, 0.0], loss, progress=False)
    assert torch.equal(model.weight, before)
    train_steps(model, data, 3, [0.0, 0.0, 0.1], loss, progress=False)
    assert not torch.equal(model.weight, before)
    with pytest.raises(ValueError, match="2 learning rates for 3 steps"):
        train_steps(model, data, 3, [0.1, 0.1], loss, progress=False)


def test_a_weighted_metric_mean_does_not_depend_on_the_order_replies_arrive_in():
    """Metrics (train loss, federated evaluate) are example-weighted means over replies that arrive in any
    order: the sum is exactly rounded. A plain left-to-right sum gives 0 or 1/3 here depending on the order."""
    import itertools

    from fedsb.aggregation.robust import weighted_scalar_mean

    pairs = [(1e16, 1), (1.0, 1), (-1e16, 1)]
    assert {weighted_scalar_mean(p) for p in itertools.permutations(pairs)} == {1.0 / 3}
    assert len({sum(x * w for x, w in p) for p in itertools.permutations(pairs)}) > 1  # what fsum prevents
    assert weighted_scalar_mean([(0.5, 3), (1.0, 1)]) == 0.625 and weighted_scalar_mean([]) is None
