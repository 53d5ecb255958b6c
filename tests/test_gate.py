"""The MoE gate: dense / top-k routing, noise, balance and entropy terms, inputs."""

from __future__ import annotations

import math

import pytest
import torch

from enecg.ensemble.config import GateSettings
from enecg.ensemble.gates import (
    ENTROPY,
    LOAD_BALANCE,
    ROUTING,
    Gate,
    build_gate,
    load_balance_loss,
    router_entropy,
)

CONTRACT = {"fs": 100.0, "leads": ["II"], "length": 50}


def make_gate(num_experts: int = 4, num_groups: int = 1, **kwargs) -> Gate:
    torch.manual_seed(0)
    # A random router start (not the uniform one): these tests look at how records are routed.
    settings = GateSettings(contract=CONTRACT, hidden_sizes=[16], **{"init_uniform": False, **kwargs})
    return build_gate(settings, num_experts, num_groups, embedding_dims=[8, 12, 6, 10][:num_experts])


@pytest.mark.parametrize("groups", [1, 3])
def test_dense_weights_are_a_softmax_summing_to_one(groups):
    gate = make_gate(num_groups=groups)
    out = gate(torch.randn(7, 1, 50))
    assert out.weights.shape == (7, groups, 4)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(7, groups))
    assert (out.weights > 0).all() and out.routed.all()
    torch.testing.assert_close(out.log_weights.exp(), out.weights)
    assert set(out.aux_losses) == {LOAD_BALANCE, ENTROPY, ROUTING}


@pytest.mark.parametrize("k", [1, 2])
def test_top_k_keeps_k_experts_with_a_renormalised_softmax(k):
    gate = make_gate(top_k=k)
    logits = torch.randn(9, 1, 4)
    out = gate.route(logits)
    assert (out.routed.sum(-1) == k).all()
    assert ((out.weights > 0) == out.routed).all()
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(9, 1))
    chosen = logits.topk(k, dim=-1).indices
    expected = torch.zeros_like(logits).scatter(-1, chosen, torch.softmax(logits.gather(-1, chosen), dim=-1))
    torch.testing.assert_close(out.weights, expected)
    assert torch.isinf(out.log_weights[~out.routed]).all()
    # Router probabilities before selection are the full softmax.
    torch.testing.assert_close(out.probs, torch.softmax(logits, -1))


def test_noisy_top_k_adds_noise_only_in_training():
    gate = make_gate(top_k=1, noisy_top_k=True)
    x = torch.randn(64, 50)
    gate.eval()
    first, second = gate(x), gate(x)
    torch.testing.assert_close(first.weights, second.weights)
    gate.train()
    torch.manual_seed(1)
    noisy = gate(x)
    assert not torch.equal(noisy.probs, first.probs)
    # The noise scale is learned: it receives gradient through the noisy logits.
    noisy.probs[:, 0, 0].sum().backward()
    assert gate.noise.weight.grad is not None and gate.noise.weight.grad.abs().sum() > 0


def test_load_balance_loss_is_minimal_at_uniform_routing():
    experts = 4
    uniform = torch.full((8, experts), 1 / experts)
    assert load_balance_loss(uniform).item() == pytest.approx(1.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        probs = torch.softmax(torch.randn(8, experts, generator=gen) * 2, -1)
        assert load_balance_loss(probs).item() >= 1.0 - 1e-6
    collapsed = torch.zeros(8, experts)
    collapsed[:, 0] = 1
    assert load_balance_loss(collapsed).item() == pytest.approx(experts)
    # Top-k form: balanced dispatch with uniform probabilities gives 1, everything to one expert gives E.
    balanced = torch.eye(experts, dtype=torch.bool).repeat(2, 1)
    assert load_balance_loss(uniform, balanced).item() == pytest.approx(1.0)
    to_first = torch.zeros(8, experts, dtype=torch.bool)
    to_first[:, 0] = True
    assert load_balance_loss(collapsed, to_first).item() == pytest.approx(experts)


def test_balance_gradient_pushes_towards_uniform():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0]] * 4, requires_grad=True)
    load_balance_loss(torch.softmax(logits, -1)).backward()
    assert logits.grad[0, 0] > 0  # decreasing the favoured expert's logit lowers the loss


def test_router_entropy():
    experts = 5
    assert router_entropy(torch.full((3, experts), -math.log(experts))).item() == pytest.approx(
        math.log(experts)
    )
    confident = torch.log_softmax(torch.tensor([[50.0, 0, 0, 0, 0]]), -1)
    assert router_entropy(confident).item() == pytest.approx(0.0, abs=1e-6)


def test_windows_are_averaged_in_logit_space():
    gate = make_gate()
    gate.eval()
    window = torch.randn(3, 1, 50)
    single = gate(window)
    repeated = gate(window.unsqueeze(1).expand(3, 4, 1, 50))
    torch.testing.assert_close(single.weights, repeated.weights)
    other = gate(torch.stack([window, torch.randn(3, 1, 50)], dim=1))
    assert not torch.allclose(single.weights, other.weights)


def test_signal_gate_rejects_inputs_of_the_wrong_size():
    with pytest.raises(ValueError, match="50 samples"):
        make_gate()(torch.randn(2, 1, 49))


def test_signal_gate_needs_a_fixed_size_contract():
    with pytest.raises(ValueError, match="leads"):
        GateSettings(contract={"fs": 100.0})


@pytest.mark.parametrize("detach", [True, False])
def test_embedding_gate_detaches_embeddings_by_choice(detach):
    gate = make_gate(num_experts=2, input="embeddings", detach_embeddings=detach)
    embeddings = [torch.randn(5, 8, requires_grad=True), torch.randn(5, 12, requires_grad=True)]
    out = gate(embeddings)
    assert out.weights.shape == (5, 1, 2)
    out.weights[:, 0, 0].sum().backward()
    if detach:
        assert all(e.grad is None for e in embeddings)
    else:
        assert all(e.grad is not None and e.grad.abs().sum() > 0 for e in embeddings)


def test_embedding_gate_is_invariant_to_an_experts_embedding_scale():
    # Layer-normalised per expert: an FM with 1000x larger features does not dominate the router.
    gate = make_gate(num_experts=2, input="embeddings")
    a, b = torch.randn(4, 8), torch.randn(4, 12)
    torch.testing.assert_close(gate([a, b]).weights, gate([a * 1000.0, b]).weights)
    with pytest.raises(ValueError, match=r"\(B, 12\)"):
        gate([a, torch.randn(4, 11)])


def test_uniform_gate():
    gate = make_gate(num_experts=3, input="uniform")
    out = gate.uniform(4)
    torch.testing.assert_close(out.weights, torch.full((4, 1, 3), 1 / 3))
    assert list(gate.parameters()) == []
    with pytest.raises(ValueError, match="top_k"):
        GateSettings(input="uniform", top_k=1)


@pytest.mark.parametrize("kind", ["signal", "embeddings"])
def test_uniform_start_and_routing_penalty(kind):
    gate = make_gate(num_experts=3, num_groups=2, input=kind, init_uniform=True)
    inputs = (
        torch.randn(5, 1, 50)
        if kind == "signal"
        else [torch.randn(5, 8), torch.randn(5, 12), torch.randn(5, 6)]
    )
    out = gate(inputs)
    torch.testing.assert_close(out.weights, torch.full((5, 2, 3), 1 / 3))
    assert float(out.aux_losses[ROUTING].detach()) == 0.0
    # The penalty is the mean over records and groups of the squared record-dependent logits, centred over
    # experts; the router's bias (the per-group weights) is free.
    with torch.no_grad():
        gate.router.bias.copy_(torch.tensor([1.0, 0.0, -1.0, 0.5, 0.5, 0.0]))
        gate.router.weight.normal_()
    out = gate(inputs)
    hidden = gate.trunk(gate.features(inputs)).mean(dim=1)
    record = (hidden @ gate.router.weight.T).reshape(5, 2, 3)
    record = record - record.mean(dim=-1, keepdim=True)
    torch.testing.assert_close(out.aux_losses[ROUTING], record.pow(2).sum(-1).mean())


def test_global_gate_learns_one_weight_vector_per_group():
    gate = make_gate(num_experts=3, num_groups=2, input="global", init_uniform=True)
    assert [n for n, _ in gate.named_parameters()] == ["router_bias"]
    out = gate.global_weights(4)
    torch.testing.assert_close(out.weights, torch.full((4, 2, 3), 1 / 3))
    with torch.no_grad():
        gate.router_bias.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0, 0.0, 3.0]))
    out = gate.global_weights(4)
    assert torch.equal(out.weights[0], out.weights[3])  # the same for every record
    assert out.weights[0, 0].argmax() == 0 and out.weights[0, 1].argmax() == 2
    with pytest.raises(RuntimeError, match="reads no input"):
        gate(torch.randn(4, 1, 50))


def test_sparse_router_keeps_a_random_start():
    gate = make_gate(num_experts=4, input="signal", top_k=1, init_uniform=True)
    assert gate.router.weight.abs().sum() > 0
