"""Baselines: which aggregates are exact, FLoRA's rank growth, FFA-LoRA's frozen A, bytes per method."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedsb import adapters
from fedsb.aggregation import robust
from fedsb.methods import FLoRA, make_method
from fedsb.tasks.models import load_base_model
from lab.tiny import set_random_bases


def _effective(model) -> dict[str, torch.Tensor]:
    return {n: (adapters.weight_as_mn(l.base_layer).double() + l.delta_weight().double())
            for n, l in adapters.adapter_layers(model).items()}


def _setup(tiny_bert, name, rank=4):
    model = load_base_model(str(tiny_bert), "seq-cls", 2, 0)
    names = adapters.find_targets(model, ["query", "value"])
    method = make_method(name, rank, 1.0, 8.0, seed=0)
    layers = method.build(model, names)
    if name == "fed-sb":  # a real orthonormal basis
        set_random_bases(layers, rank, seed=0)
    return model, method


def _round(model, method, k=3, seed=0):
    """k clients each perturb the global vector; returns (clients' effective weights, weights)."""
    g = np.random.default_rng(seed)
    base_vec = method.get_vector(model)
    vecs = [base_vec + g.normal(0, 0.1, base_vec.shape).astype(np.float32) for _ in range(k)]
    weights = [1.0, 2.0, 3.0][:k]
    client_eff = []
    for v in vecs:
        m = copy.deepcopy(model)
        method.set_vector(m, v)
        client_eff.append(_effective(m))
    return vecs, weights, client_eff


@pytest.mark.parametrize("name, exact", [("fed-sb", True), ("fedit", False), ("ffa-lora", True),
                                         ("fedex-lora", True), ("flora", True)])
def test_which_aggregates_are_exact(tiny_bert, name, exact):
    torch.manual_seed(0)
    model, method = _setup(tiny_bert, name)
    if name in ("fedit", "fedex-lora", "flora"):  # B starts at zero: give it a value so products differ
        with torch.no_grad():
            for l in adapters.adapter_layers(model).values():
                l.lora_B.weight.normal_(0, 0.1)
    vecs, weights, client_eff = _round(model, method)
    w = np.array(weights) / sum(weights)
    target = {n: sum(wi * e[n] for wi, e in zip(w, client_eff)) for n in client_eff[0]}
    new = method.aggregate(model, vecs, weights, robust.weighted_mean)
    method.set_vector(model, new)
    method.after_round(model, 1)
    got = _effective(model)
    err = max(float((got[n] - target[n]).detach().abs().max()) for n in target)
    if exact:
        assert err <= 1e-6, err
    else:
        assert err > 1e-4, err  # FedIT: mean(B)·mean(A) differs measurably from mean(B·A)


def test_flora_rank_grows_with_clients_and_ffa_keeps_A(tiny_bert):
    model, method = _setup(tiny_bert, "flora", rank=4)
    vecs, weights, _ = _round(model, method, k=3)
    method.set_vector(model, method.aggregate(model, vecs, weights, robust.weighted_mean))
    name = next(iter(adapters.adapter_layers(model)))
    assert isinstance(method, FLoRA) and method.global_rank(name) == 3 * 4
    vecs, weights, _ = _round(model, method, k=2, seed=1)
    method.aggregate(model, vecs, weights, robust.weighted_mean)
    assert method.global_rank(name) == 3 * 4 + 2 * 4

    model, method = _setup(tiny_bert, "ffa-lora")
    A_before = {n: l.lora_A.weight.detach().clone() for n, l in adapters.adapter_layers(model).items()}
    assert all("lora_A" not in n for n in method.trainable(model))  # A never travels
    vecs, weights, _ = _round(model, method)
    method.set_vector(model, method.aggregate(model, vecs, weights, robust.weighted_mean))
    for n, l in adapters.adapter_layers(model).items():
        assert torch.equal(l.lora_A.weight, A_before[n])


def test_payload_sizes_follow_the_design_table(tiny_bert):
    """Numbers per round per client: Fed-SB r², FedIT r(m+n), FFA-LoRA r·m (per layer), plus the head."""
    r = 4
    sizes = {}
    for name in ("fed-sb", "fedit", "ffa-lora"):
        model, method = _setup(tiny_bert, name, rank=r)
        sizes[name] = method.get_vector(model).size
        layers = adapters.adapter_layers(model)
    head = 2 * 32 + 2
    assert sizes["fed-sb"] == len(layers) * r * r + head
    assert sizes["fedit"] == sum(r * (l.out_features + l.in_features) for l in layers.values()) + head
    assert sizes["ffa-lora"] == sum(r * l.out_features for l in layers.values()) + head


def test_a_methods_message_keys_travel_only_with_that_method():
    # what the server sends in every train/evaluate config: the generic defaults, then the method's own keys
    from fedsb.methods import REGISTRY
    from fedsb.wire import MESSAGE_CONFIG_DEFAULTS

    for name in REGISTRY:
        keys = {**MESSAGE_CONFIG_DEFAULTS, **make_method(name, 4, 1.0, 8.0, 0).round_config()}
        assert ("flora-stacks" in keys) == (name == "flora"), (name, keys)
