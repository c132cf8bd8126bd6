"""Mixture of experts (x_llama.variants.mixture_of_experts) against transformers' Mixtral block and loss, and the
gating, z-loss and dropless invariants by hand."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

from x_llama import LlamaConfig
from x_llama.variants.mixture_of_experts import MoEFeedForward, load_balance_loss, router_z_loss

DIM, HIDDEN = 32, 48


def make_moe(n_experts: int = 4, top_k: int = 2, seed: int = 0, **moe) -> MoEFeedForward:
    config = LlamaConfig.from_preset(
        "tiny", dim=DIM, n_heads=4, n_layers=2, ffn="moe", moe={"n_experts": n_experts, "top_k": top_k, "hidden_dim": HIDDEN, **moe}
    )
    torch.manual_seed(seed)
    layer = MoEFeedForward(config, layer_index=0)
    for parameter in layer.parameters():  # weights large enough that the experts' outputs differ clearly
        torch.nn.init.normal_(parameter, std=0.3)
    return layer


def inputs(batch: int = 2, length: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, DIM, generator=torch.Generator().manual_seed(seed))


def reference_by_token(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Shazeer eq. 1 one token at a time: sum over the token's top-k experts of its renormalised probability times
    the expert's output (no batching, no grouping, nothing can be dropped)."""
    tokens = x.reshape(-1, DIM)
    rows = []
    for token in tokens:
        probabilities = torch.softmax(token @ layer.gate.weight.T, dim=-1)
        top, chosen = probabilities.topk(layer.top_k)
        weights = top / top.sum() if layer.top_k > 1 else top
        rows.append(sum(w * layer.experts[int(e)](token) for w, e in zip(weights, chosen)))
    return torch.stack(rows).view_as(x)


@pytest.mark.parametrize("n_experts, top_k", [(4, 2), (8, 3)])
def test_matches_transformers_mixtral_block(n_experts, top_k):
    """Same output as transformers' MixtralSparseMoeBlock given the same router and expert weights (transformers
    5.23 stacks each expert's [w1; w3] into gate_up_proj (E, 2h, d) and w2 into down_proj (E, d, h))."""
    ours = make_moe(n_experts, top_k).eval()
    hf_config = MixtralConfig(
        hidden_size=DIM, intermediate_size=HIDDEN, num_local_experts=n_experts, num_experts_per_tok=top_k, router_jitter_noise=0.0
    )
    reference = MixtralSparseMoeBlock(hf_config).eval()
    with torch.no_grad():
        reference.gate.weight.copy_(ours.gate.weight)
        for index, expert in enumerate(ours.experts):
            reference.experts.gate_up_proj[index].copy_(torch.cat([expert.w1.weight, expert.w3.weight], dim=0))
            reference.experts.down_proj[index].copy_(expert.w2.weight)
    x = inputs(3, 7)
    torch.testing.assert_close(ours(x), reference(x.clone()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_load_balance_equals_transformers_divided_by_top_k(top_k):
    """Our loss_balance (f = assignments / (k T)) is transformers' load_balancing_loss_func (assignments / T) / k,
    read off `aux_loss` with the z-loss weight 0; for k = 1 both are Switch eq. 4 exactly."""
    layer = make_moe(8, top_k, aux_loss_weight=1.0, z_loss_weight=0.0).train()
    x = inputs(4, 6)
    layer(x)
    logits = layer.gate(x.reshape(-1, DIM))
    expected = load_balancing_loss_func((logits,), num_experts=8, top_k=top_k) / top_k
    torch.testing.assert_close(layer.aux_loss, expected, rtol=1e-6, atol=1e-6)
    counts = torch.bincount(logits.softmax(-1).topk(top_k).indices.flatten(), minlength=8)
    load = counts * 8 / (logits.shape[0] * top_k)  # share of the assignments times E: 1 = even
    assert layer.aux_metrics["moe/load_max"] == pytest.approx(load.max().item())
    assert layer.aux_metrics["moe/load_min"] == pytest.approx(load.min().item())
    assert layer.aux_metrics["moe/load_balance"] == pytest.approx(expected.item(), rel=1e-6)


def test_load_balance_is_one_when_balanced_and_e_when_collapsed():
    """E sum_i f_i P_i: uniform probabilities and even assignments give 1; every token on one expert with
    probability ~1 gives E (the paper's range)."""
    n_experts = 4
    even_experts = torch.arange(8).remainder(n_experts).view(8, 1)
    assert load_balance_loss(torch.zeros(8, n_experts), even_experts).item() == pytest.approx(1.0)
    collapsed = torch.full((8, n_experts), -30.0)
    collapsed[:, 2] = 30.0
    assert load_balance_loss(collapsed, torch.full((8, 1), 2)).item() == pytest.approx(n_experts)


def test_z_loss_by_hand_on_known_logits():
    """ST-MoE eq. 5 on logits set through the router (token j = unit vector e_j reads column j of W_g):
    mean over tokens of (log sum_i exp z_i)^2, in plain Python."""
    layer = make_moe(3, 2, aux_loss_weight=0.0, z_loss_weight=1.0).train()
    known = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 4.0, 0.5]]  # one row of logits per token
    with torch.no_grad():
        layer.gate.weight.zero_()
        for token, row in enumerate(known):
            layer.gate.weight[:, token] = torch.tensor(row)
    x = torch.eye(DIM)[: len(known)].view(1, len(known), DIM)
    layer(x)
    expected = sum(math.log(sum(math.exp(z) for z in row)) ** 2 for row in known) / len(known)
    assert layer.aux_loss.item() == pytest.approx(expected, rel=1e-6)
    assert router_z_loss(torch.tensor(known)).item() == pytest.approx(expected, rel=1e-6)


def test_aux_loss_is_the_weighted_sum_in_training_and_none_in_eval():
    layer = make_moe(4, 2, aux_loss_weight=0.3, z_loss_weight=0.05).train()
    x = inputs()
    layer(x)
    logits = layer.gate(x.reshape(-1, DIM))
    experts = logits.softmax(-1).topk(2).indices
    torch.testing.assert_close(layer.aux_loss, 0.3 * load_balance_loss(logits, experts) + 0.05 * router_z_loss(logits))
    layer.eval()
    layer(x)
    assert layer.aux_loss is None


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_every_token_reaches_its_top_k_experts(top_k):
    """A router that sends every token to the same experts (a capacity factor would drop most of them): each token
    still gets top_k distinct experts whose weights sum to 1 (k > 1), and the output is the per-token sum."""
    layer = make_moe(4, top_k).eval()
    with torch.no_grad():
        layer.gate.weight[:top_k] += 5.0 * torch.ones(DIM) / DIM**0.5  # experts 0..k-1 win for inputs near +1
    x = inputs(2, 16).abs() + 1.0
    routing = layer.route(x.reshape(-1, DIM))
    assert routing.experts.shape == (32, top_k)
    assert all(len(set(row.tolist())) == top_k for row in routing.experts)
    assert set(routing.experts.flatten().tolist()) == set(range(top_k))  # all tokens on the same experts
    if top_k > 1:
        torch.testing.assert_close(routing.weights.sum(-1), torch.ones(32))
    torch.testing.assert_close(layer(x), reference_by_token(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 3])
def test_random_inputs_match_the_per_token_reference(top_k):
    layer = make_moe(8, top_k).eval()
    x = inputs(3, 9, seed=5)
    torch.testing.assert_close(layer(x), reference_by_token(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_gradient_reaches_the_router_from_the_output(top_k):
    """With the aux losses switched off the router learns only through the gating weights G(x): its gradient must
    be nonzero (for k = 1 this needs Switch's p_i; Mixtral's renormalised weight would be the constant 1). Every
    expert that received a token gets a gradient as well."""
    layer = make_moe(4, top_k, aux_loss_weight=0.0, z_loss_weight=0.0).train()
    x = inputs(2, 8)
    (layer(x) * torch.randn(2, 8, DIM, generator=torch.Generator().manual_seed(3))).sum().backward()
    assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().max() > 1e-3
    used = set(layer.route(x.reshape(-1, DIM)).experts.flatten().tolist())
    for index, expert in enumerate(layer.experts):
        has_gradient = expert.w1.weight.grad is not None and expert.w1.weight.grad.abs().sum() > 0
        assert has_gradient == (index in used)


@pytest.mark.parametrize("aux_loss_weight, z_loss_weight", [(1.0, 0.0), (0.0, 1.0), (0.7, 0.2)])
def test_aux_loss_gradient_is_the_analytic_one(aux_loss_weight, z_loss_weight):
    """The router's gradient of aux_loss, written out by hand per token's logits z (N tokens, p = softmax(z)):
    balance: d/dz_j [E sum_i f_i P_i] = E/N p_j (f_j - <f, p>) (f counts assignments, no gradient);
    z-loss:  d/dz_j [1/N sum (lse z)^2] = 2/N lse(z) p_j.  dW_g = dz^T x."""
    layer = make_moe(4, 2, aux_loss_weight=aux_loss_weight, z_loss_weight=z_loss_weight).train()
    x = inputs(2, 6)
    layer(x)
    layer.aux_loss.backward()
    tokens = x.reshape(-1, DIM)
    with torch.no_grad():
        logits = tokens @ layer.gate.weight.T
        p, n_tokens = logits.softmax(-1), tokens.shape[0]
        f = torch.bincount(p.topk(2).indices.flatten(), minlength=4).float() / (2 * n_tokens)
        d_balance = 4 / n_tokens * p * (f - (p * f).sum(-1, keepdim=True))
        d_z = 2 / n_tokens * torch.logsumexp(logits, -1, keepdim=True) * p
        expected = (aux_loss_weight * d_balance + z_loss_weight * d_z).T @ tokens  # (E, dim)
    torch.testing.assert_close(layer.gate.weight.grad, expected, rtol=1e-5, atol=1e-6)


def test_active_parameters_and_initialisation_flags():
    layer = make_moe(8, 2)
    assert layer.active_parameters() == 8 * DIM + 2 * 3 * DIM * HIDDEN
    total = sum(p.numel() for p in layer.parameters())
    assert total == 8 * DIM + 8 * 3 * DIM * HIDDEN
    assert all(expert.w2.is_residual_projection for expert in layer.experts)
    assert not any(getattr(expert.w1, "is_residual_projection", False) for expert in layer.experts)


def test_hidden_dim_defaults_to_the_dense_ffn():
    config = LlamaConfig.from_preset("tiny", ffn="moe", moe={"n_experts": 2, "top_k": 1})
    assert MoEFeedForward(config, 0).hidden_dim == config.hidden_dim


def test_wrong_input_width_is_a_clear_error():
    with pytest.raises(ValueError, match="dim=32"):
        make_moe()(torch.randn(1, 3, DIM + 1))
