"""PEER (x_llama.variants.peer): product-key retrieval against an exhaustive top-k over all N keys, the layer against
a dense computation over every expert, and the sparsity of its gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from x_llama import LlamaConfig
from x_llama.variants.peer import PEERFeedForward

DIM = 32


def make_peer(n_experts: int = 64, heads: int = 2, top_k: int = 4, seed: int = 0, **peer) -> PEERFeedForward:
    config = LlamaConfig.from_preset(
        "tiny", dim=DIM, n_heads=4, n_layers=2, ffn="peer", peer={"n_experts": n_experts, "heads": heads, "top_k": top_k, **peer}
    )
    torch.manual_seed(seed)
    return PEERFeedForward(config, layer_index=0)


def inputs(batch: int = 2, length: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, DIM, generator=torch.Generator().manual_seed(seed))


def full_keys(layer: PEERFeedForward) -> torch.Tensor:
    """Every expert's key built by brute force, (N, key_dim): expert i n + j has key [c_i; c'_j]."""
    n = layer.n_sub_keys
    rows = [torch.cat([layer.sub_keys[0, i], layer.sub_keys[1, j]]) for i in range(n) for j in range(n)]
    return torch.stack(rows)


@pytest.mark.parametrize("n_experts, top_k, key_dim", [(64, 4, 8), (256, 8, 16), (1024, 16, 12), (1024, 32, 16)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_product_key_top_k_equals_exhaustive_top_k(n_experts, top_k, key_dim, seed):
    """The central property (Lample et al. 2019): top-k over the k^2 candidates of the two sub-key top-k's is the
    top-k over all N = n^2 concatenated keys, same scores and same expert indices."""
    layer = make_peer(n_experts, heads=3, top_k=top_k, key_dim=key_dim, seed=seed)
    queries = torch.randn(5, 7, 3, key_dim, generator=torch.Generator().manual_seed(100 + seed))
    with torch.no_grad():
        scores, experts = layer.retrieve(queries)
        exhaustive_scores, exhaustive_experts = (queries @ full_keys(layer).T).topk(top_k, dim=-1)
    assert scores.shape == experts.shape == (5, 7, 3, top_k)
    torch.testing.assert_close(scores, exhaustive_scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(experts, exhaustive_experts)


def dense_reference(layer: PEERFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Every one of the N experts evaluated on every token; each head's router weight is the softmax over its
    exhaustive top-k scores and 0 elsewhere; heads summed (PEER eq. 1-3, 6-7)."""
    tokens = x.reshape(-1, DIM)
    queries = layer.queries(tokens)  # (N_tok, H, key_dim)
    all_scores = queries @ full_keys(layer).T  # (N_tok, H, N)
    top_scores, top_experts = all_scores.topk(layer.top_k, dim=-1)
    router = torch.zeros_like(all_scores).scatter(-1, top_experts, top_scores.softmax(-1))  # (N_tok, H, N)
    activation = F.gelu(tokens @ layer.expert_down.weight.T)  # sigma(u_i^T x) for all i, (N_tok, N)
    return ((router.sum(1) * activation) @ layer.expert_up.weight).view_as(x)


@pytest.mark.parametrize("query_batchnorm", [True, False])
@pytest.mark.parametrize("n_experts, heads, top_k", [(64, 1, 4), (256, 3, 8)])
def test_layer_equals_dense_computation_over_all_experts(query_batchnorm, n_experts, heads, top_k):
    layer = make_peer(n_experts, heads, top_k, query_batchnorm=query_batchnorm).eval()
    with torch.no_grad():  # experts large enough that sigma(u^T x) is far from linear, non-trivial running stats
        layer.expert_down.weight.normal_(0, 0.5)
        layer.expert_up.weight.normal_(0, 0.5)
        if query_batchnorm:
            layer.query_norm.running_mean.normal_(0, 0.3)
            layer.query_norm.running_var.uniform_(0.5, 2.0)
    x = inputs(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_reference(layer, x), rtol=1e-5, atol=1e-5)


def test_training_mode_normalises_queries_over_the_batch():
    """In training the query BatchNorm uses the batch statistics: every query feature has mean 0, variance 1 over
    the tokens (with the initial affine 1, 0); without BatchNorm the queries are the raw projections."""
    layer = make_peer(64, heads=2, top_k=4).train()
    tokens = inputs(4, 8).reshape(-1, DIM) * 3 + 1
    queries = layer.queries(tokens).reshape(32, -1)
    torch.testing.assert_close(queries.mean(0), torch.zeros(queries.shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(queries.var(0, unbiased=False), torch.ones(queries.shape[1]), atol=1e-3, rtol=0)
    plain = make_peer(64, heads=2, top_k=4, query_batchnorm=False).train()
    torch.testing.assert_close(plain.queries(tokens).reshape(32, -1), tokens @ plain.query.weight.T)


def test_gradient_reaches_only_the_selected_experts():
    """Sparse gradient: u_i, v_i rows of the retrieved experts (any head, any token) get a gradient, every other
    row exactly 0; sub-keys only where a retrieved expert uses them; the query network gets one."""
    layer = make_peer(256, heads=2, top_k=4).train()
    x = inputs(1, 3)
    out = layer(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
    with torch.no_grad():  # the same batch, so the same batch statistics and queries as in the forward
        _, experts = layer.retrieve(layer.queries(x.reshape(-1, DIM)))
    selected = torch.zeros(256, dtype=torch.bool)
    selected[experts.flatten()] = True
    assert 0 < int(selected.sum()) < 256
    for table in (layer.expert_down, layer.expert_up):
        row_has_gradient = table.weight.grad.abs().sum(-1) > 0
        assert torch.equal(row_has_gradient, selected)
    used_first = torch.zeros(16, dtype=torch.bool)
    used_first[(experts // 16).flatten()] = True
    assert torch.equal(layer.sub_keys.grad[0].abs().sum(-1) > 0, used_first)
    assert layer.query.weight.grad.abs().sum() > 0


def test_active_parameters():
    layer = make_peer(256, heads=3, top_k=8, key_dim=16)
    query = DIM * 3 * 16 + 2 * 3 * 16  # Linear + BatchNorm affine
    assert layer.active_parameters() == query + 2 * 16 * 8 + 3 * 8 * 2 * DIM
    assert sum(p.numel() for p in layer.parameters()) == query + 2 * 16 * 8 + 256 * 2 * DIM


def test_default_key_dim_and_initialisation():
    layer = make_peer(64, heads=1, top_k=2)
    assert layer.key_dim == DIM // 2
    assert layer.expert_up.weight.std().item() == pytest.approx(0.02 / 2, rel=0.1)  # init_std / sqrt(2 n_layers)
    assert layer.expert_down.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_bad_configurations_are_clear_errors():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        make_peer(64, top_k=2).train()(torch.randn(1, 1, DIM))
    with pytest.raises(ValueError, match="dim=32"):
        make_peer(64, top_k=2)(torch.randn(1, 3, DIM + 2))


def test_dense_and_gathered_expert_scores_agree(monkeypatch):
    """`expert_scores` scores every expert with one matmul for small pools and gathers the retrieved u_i for large
    ones: same outputs and same gradients (forcing the gather path by lowering the threshold)."""
    import x_llama.variants.peer as peer_module

    results = []
    for threshold in (peer_module.DENSE_SCORES_UP_TO, 0):
        monkeypatch.setattr(peer_module, "DENSE_SCORES_UP_TO", threshold)
        layer = make_peer(256, heads=2, top_k=8, seed=3).eval()
        x = inputs(seed=4).requires_grad_(True)
        out = layer(x)
        out.square().sum().backward()
        results.append((out.detach(), x.grad, layer.expert_down.weight.grad, layer.query.weight.grad))
    for dense, gathered in zip(*results):
        torch.testing.assert_close(dense, gathered, rtol=1e-5, atol=1e-6)
