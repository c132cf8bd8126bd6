"""PEER: parameter efficient expert retrieval (He 2024, "Mixture of A Million Experts", arXiv:2407.04153) in place
of the dense feed-forward (x_llama `LlamaConfig.ffn = "peer"`, sizes in `LlamaConfig.peer`).

A pool of N tiny experts, each one hidden neuron (the paper's section on the PEER layer), with u_i, v_i in R^dim:

    e_i(x) = sigma(u_i^T x) v_i                                         sigma = GELU (the paper leaves it open)

A query network q(x) (a bias-free Linear to key_dim, then the query BatchNorm of Lample et al. 2019 when
`peer.query_batchnorm`) retrieves the k experts whose keys k_i score highest, and mixes them:

    I = T_k({q(x)^T k_i}_{i=1..N}),    g_i(x) = softmax_{i in I}(q(x)^T k_i),    f(x) = sum_{i in I} g_i(x) e_i(x)

Product keys (Lample et al. 2019, "Large Memory Layers with Product Keys", section 3; adopted by PEER). The N = n^2
keys are never stored: key (i, j) is the concatenation [c_i; c'_j] of two sub-keys from two sets C, C' of n
vectors of size key_dim/2 each (`sub_keys`, (2, n, key_dim/2)), expert index i n + j. With q = [q_1; q_2],

    q^T [c_i; c'_j] = q_1^T c_i + q_2^T c'_j
    I_C = T_k(q_1^T c_i),  I_C' = T_k(q_2^T c'_j),   I = T_k({q_1^T c_i + q_2^T c'_j : i in I_C, j in I_C'})

is *exactly* the top-k over all N keys: if (i, j) is in the overall top-k and i were not in I_C, the k sub-keys
of I_C would each beat c_i and, paired with c'_j, give k keys scoring above (i, j). Cost: 2 n + k^2 scores
instead of N = n^2.

Multi-head retrieval: H query networks (one Linear to H key_dim, one BatchNorm over it) share the
experts and the sub-keys; each head retrieves its own k experts and the heads' outputs add up:

    f(x) = sum_{h=1..H} sum_{i in I^h} g^h_i(x) e_i(x)

so a token uses H k singleton experts, a dynamically assembled MLP with H k hidden neurons.

Query BatchNorm normalises each query feature over the training batch, so in training a token's query depends on
the other tokens of the batch (later positions included); at inference it uses the running statistics and is
causal. `peer.query_batchnorm = false` drops it.

The paper's equations are cited by name, not number: their numbers were not checked against the paper here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..config import LlamaConfig

DENSE_SCORES_UP_TO = 16_384  # expert pools up to this size score every expert with one matmul (`expert_scores`)


class PEERFeedForward(nn.Module):
    """x (B, T, dim) -> sum over H heads of the softmax-weighted top-k singleton experts, (B, T, dim).

    Parameters: `query` (Linear(dim, H key_dim), bias-free), `query_norm` (BatchNorm1d or Identity),
    `sub_keys` (2, n, key_dim / 2) = C and C', `expert_down` (Embedding(N, dim): the u_i) and `expert_up`
    (Embedding(N, dim): the v_i, a residual output initialised with init_std / sqrt(2 n_layers))."""

    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        peer = config.peer
        self.layer_index = layer_index
        self.dim, self.n_experts, self.heads, self.top_k = config.dim, peer.n_experts, peer.heads, peer.top_k
        self.n_sub_keys = math.isqrt(peer.n_experts)
        if self.n_sub_keys**2 != peer.n_experts:
            raise ValueError(f"peer.n_experts={peer.n_experts} must be a perfect square n^2 (product keys pair n x n sub-keys)")
        if not 0 < peer.top_k <= self.n_sub_keys:
            raise ValueError(f"peer.top_k={peer.top_k} must be in [1, sqrt(n_experts)={self.n_sub_keys}]; lower top_k or add experts")
        self.key_dim = config.dim // 2 if peer.key_dim is None else peer.key_dim
        if self.key_dim <= 0 or self.key_dim % 2 != 0:
            raise ValueError(f"PEER key_dim={self.key_dim} must be positive and even (queries split in two halves); set peer.key_dim")
        self.init_std = config.init_std
        self.residual_std = config.init_std / math.sqrt(2 * config.n_layers)

        self.query = nn.Linear(config.dim, self.heads * self.key_dim, bias=False)  # the H query networks
        self.query_norm: nn.Module = nn.BatchNorm1d(self.heads * self.key_dim) if peer.query_batchnorm else nn.Identity()
        self.sub_keys = nn.Parameter(torch.empty(2, self.n_sub_keys, self.key_dim // 2))  # C, C'
        self.expert_down = nn.Embedding(peer.n_experts, config.dim)  # u_i
        self.expert_up = nn.Embedding(peer.n_experts, config.dim)  # v_i
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Sub-keys N(0, 1/(key_dim/2)) so a unit-variance (batch-normed) query scores with unit variance; u_i
        N(0, init_std) like Llama's w1; v_i N(0, init_std / sqrt(2 n_layers)) like the residual projection w2."""
        nn.init.normal_(self.sub_keys, 0.0, (self.key_dim // 2) ** -0.5)
        nn.init.normal_(self.expert_down.weight, 0.0, self.init_std)
        nn.init.normal_(self.expert_up.weight, 0.0, self.residual_std)

    def queries(self, tokens: Tensor) -> Tensor:
        """q(x) for every head: tokens (N, dim) -> (N, H, key_dim), batch-normed over the N tokens in training."""
        if self.training and isinstance(self.query_norm, nn.BatchNorm1d) and tokens.shape[0] < 2:
            raise ValueError(
                "PEER's query BatchNorm needs at least 2 tokens per training batch; call .eval() or set peer.query_batchnorm=false"
            )
        return rearrange(self.query_norm(self.query(tokens)), "n (h d) -> n h d", h=self.heads)

    def retrieve(self, queries: Tensor) -> tuple[Tensor, Tensor]:
        """Product-key top-k (Lample et al. 2019, as in PEER): queries (..., key_dim) -> the k best scores
        q^T k_i (..., k) in decreasing order and their expert indices i n + j (..., k)."""
        k, n = self.top_k, self.n_sub_keys
        first_half, second_half = queries.chunk(2, dim=-1)  # q_1, q_2: (..., key_dim / 2)
        scores_first = first_half @ self.sub_keys[0].T  # q_1^T c_i, (..., n)
        scores_second = second_half @ self.sub_keys[1].T  # q_2^T c'_j, (..., n)
        best_first, index_first = scores_first.topk(k, dim=-1)  # I_C, (..., k)
        best_second, index_second = scores_second.topk(k, dim=-1)  # I_C', (..., k)
        candidates = best_first[..., :, None] + best_second[..., None, :]  # (..., k, k): k^2 candidate keys
        scores, flat = candidates.flatten(-2).topk(k, dim=-1)  # (..., k) over the k^2 candidates
        row, column = flat.div(k, rounding_mode="floor"), flat.remainder(k)
        experts = index_first.gather(-1, row) * n + index_second.gather(-1, column)  # expert i n + j
        return scores, experts

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"PEERFeedForward expects (..., dim={self.dim}) inputs, got shape {tuple(x.shape)}; pass the normed hidden states"
            )
        tokens = rearrange(x, "... d -> (...) d")  # (N, dim)
        scores, experts = self.retrieve(self.queries(tokens))  # (N, H, k) each
        router = scores.float().softmax(dim=-1)  # g^h_i(x) over each head's k experts
        activation = F.gelu(self.expert_scores(tokens, experts))  # sigma(u_i^T x), (N, H, k)
        weights = rearrange(router * activation, "n h k -> n (h k)")  # g^h_i(x) sigma(u_i^T x)
        # sum over heads and experts of weight * v_i without materialising the (N, H k, dim) tensor of v_i
        out = F.embedding_bag(
            rearrange(experts, "n h k -> n (h k)"),
            self.expert_up.weight,
            per_sample_weights=weights.to(self.expert_up.weight.dtype),
            mode="sum",
        )  # (N, dim)
        return out.to(x.dtype).view_as(x)

    def expert_scores(self, tokens: Tensor, experts: Tensor) -> Tensor:
        """u_i^T x for each token's retrieved experts: tokens (N, dim), experts (N, H, k) -> (N, H, k).

        Two computations of the same numbers. For a pool of the size a CPU run uses (N_experts <= DENSE_SCORES_UP_TO)
        the dense product x U^T over *every* expert, (N, N_experts), then picking the retrieved entries, is one
        matmul and is several times faster than gathering H k rows of U per token (an (N, H k, dim) tensor, 268 MB
        per layer at the `cpu` preset's batch); the gradient is the same, non-zero only on retrieved experts. For
        the paper's million experts the gather is the only affordable way, and the one used."""
        if self.n_experts <= DENSE_SCORES_UP_TO:
            every = tokens @ self.expert_down.weight.T  # (N, N_experts)
            return every.gather(1, rearrange(experts, "n h k -> n (h k)")).view_as(experts)
        down = self.expert_down(experts)  # u_i, (N, H, k, dim)
        return torch.einsum("nhkd,nd->nhk", down, tokens)

    def active_parameters(self) -> int:
        """Parameters one token uses: its query networks (+ BatchNorm's affine), all 2 n sub-keys (every sub-key is
        scored) and its H k experts (u_i and v_i, 2 dim each)."""
        query = sum(p.numel() for p in self.query.parameters()) + sum(p.numel() for p in self.query_norm.parameters())
        return query + self.sub_keys.numel() + self.heads * self.top_k * 2 * self.dim

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, heads={self.heads}, top_k={self.top_k}, key_dim={self.key_dim}"


__all__ = ["PEERFeedForward"]
