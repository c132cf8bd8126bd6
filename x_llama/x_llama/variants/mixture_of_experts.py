"""Sparse mixture of SwiGLU experts in place of the dense feed-forward: dropless top-k routing.

Four papers, one layer (x_llama `LlamaConfig.ffn = "moe"`, sizes in `LlamaConfig.moe`):

Gating (Shazeer et al. 2017, "Outrageously Large Neural Networks", section 2 eq. 1 and section 2.1 eq. 3 and 5,
without eq. 4's noise). A router W_g (`gate`, bias-free) scores the E experts; only the k best run:

    y = sum_{i=1..E} G(x)_i E_i(x)                                                           (Shazeer eq. 1)
    G(x) = Softmax(KeepTopK(x W_g, k))                                                        (eq. 3)
    KeepTopK(v, k)_i = v_i if v_i is among the k largest of v, else -inf                      (eq. 5)

Softmax over the k kept logits equals the full softmax p = Softmax(x W_g) restricted to the top k and
renormalised, G(x)_i = p_i / sum_{j in topk} p_j, which is how Mixtral (Jiang et al. 2024, section 2.1) writes it
and how `route` computes it. For k = 1 that weight is the constant 1 and the output would carry no gradient to
the router, so k = 1 follows the Switch Transformer instead (Fedus et al. 2021, section 2.1 eq. 2):
y = p_i(x) E_i(x) with the un-renormalised probability of the chosen expert.

Experts (Mixtral, section 2.1): each E_i is Llama's SwiGLU, E_i(x) = W2_i (silu(W1_i x) * W3_i x), with
`moe.hidden_dim` hidden units (None = the dense FFN's, as in Mixtral).

Load balancing (Switch Transformer, section 2.2 eq. 4-6), over the T tokens of the batch:

    loss_balance = E * sum_i f_i P_i                                                          (Switch eq. 4)
    f_i = 1/(k T) sum_x #[expert i is among x's top k]                                        (eq. 5, top-k form)
    P_i = 1/T sum_x p_i(x)                                                                    (eq. 6)

For k = 1 f_i is eq. 5 exactly (the fraction of tokens routed to i). For k > 1 we divide the assignment counts by
k T so that f sums to 1 and a perfectly balanced router scores 1 for every k; transformers'
`load_balancing_loss_func(logits, E, top_k=k)` divides by T only, so it equals k * loss_balance.

Router z-loss (Zoph et al. 2022, "ST-MoE", section 3, eq. 5), keeps the router logits z small:

    loss_z = 1/T sum_x (log sum_{j=1..E} exp z_j(x))^2

`aux_loss` = moe.aux_loss_weight * loss_balance + moe.z_loss_weight * loss_z (alpha = 0.01 in Switch, 0.001 for the
z-loss in ST-MoE). Dropless: there is no capacity factor, every token reaches its k experts however unbalanced
the routing (the "dropless" MoE of Gale et al. 2023, MegaBlocks); tokens are grouped by expert with one sort, and
each expert runs once on its own tokens (`run_experts`, left eager under torch.compile: its group sizes change
every step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..config import LlamaConfig
from ..model import SwiGLU


@dataclass
class Routing:
    """Where each of N tokens goes: its router logits z (N, E), its top-k experts (N, k) (best first) and their
    weights G(x) (N, k) (renormalised top-k probabilities; Switch's p_i for k = 1), in float32."""

    logits: Tensor
    experts: Tensor
    weights: Tensor


def load_balance_loss(logits: Tensor, experts: Tensor) -> Tensor:
    """Switch eq. 4-6 in its top-k form, E * sum_i f_i P_i: logits (N, E), chosen experts (N, k) -> scalar.
    1 for a perfectly balanced router (f = P = 1/E); transformers' load_balancing_loss_func is k times this."""
    n_experts = logits.shape[-1]
    probabilities = logits.float().softmax(dim=-1)  # p(x), (N, E)
    assignments = F.one_hot(experts, n_experts).sum(dim=(0, 1)).to(probabilities.dtype)  # tokens per expert, (E,)
    fraction_routed = assignments / experts.numel()  # f_i: share of the N k assignments, sums to 1
    mean_probability = probabilities.mean(dim=0)  # P_i, (E,)
    return n_experts * (fraction_routed * mean_probability).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE eq. 5: mean over tokens of (logsumexp_j z_j)^2; logits (N, E) -> scalar, in float32."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


class MoEFeedForward(nn.Module):
    """x (B, T, dim) -> sum over each token's top-k SwiGLU experts of G(x)_i E_i(x), (B, T, dim).

    Parameters: `gate` (the router W_g, Linear(dim, n_experts), Mixtral's name) and `experts` (a ModuleList of
    SwiGLU with w1 gate, w3 up, w2 down; w2 is a residual output projection). In training every forward sets
    `aux_loss` (already weighted) and `aux_metrics`; in eval `aux_loss` is None."""

    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        moe = config.moe
        if not 0 < moe.top_k <= moe.n_experts:
            raise ValueError(f"moe.top_k={moe.top_k} must be in [1, moe.n_experts={moe.n_experts}]; lower top_k or add experts")
        self.layer_index = layer_index
        self.dim = config.dim
        self.n_experts, self.top_k = moe.n_experts, moe.top_k
        self.hidden_dim = config.hidden_dim if moe.hidden_dim is None else moe.hidden_dim
        self.aux_loss_weight, self.z_loss_weight = moe.aux_loss_weight, moe.z_loss_weight
        self.gate = nn.Linear(config.dim, moe.n_experts, bias=False)  # router W_g
        self.experts = nn.ModuleList(SwiGLU(config.dim, self.hidden_dim) for _ in range(moe.n_experts))
        for expert in self.experts:
            expert.w2.is_residual_projection = True  # initialised with init_std / sqrt(2 n_layers) by Llama
        self.aux_loss: Tensor | None = None
        self.aux_metrics: dict[str, float] = {}

    def route(self, tokens: Tensor) -> Routing:
        """Shazeer eq. 1 gating on tokens (N, dim): softmax in float32, top-k, renormalised (Switch's p_i for k = 1)."""
        logits = self.gate(tokens).float()  # z = x W_g, (N, E)
        probabilities = logits.softmax(dim=-1)  # p(x), (N, E)
        top_probabilities, experts = probabilities.topk(self.top_k, dim=-1)  # (N, k) each, best first
        if self.top_k > 1:
            weights = top_probabilities / top_probabilities.sum(dim=-1, keepdim=True)  # Softmax(KeepTopK(z, k))
        else:
            weights = top_probabilities  # Switch eq. 2: keep p_i so the router gets a gradient
        return Routing(logits=logits, experts=experts, weights=weights)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"MoEFeedForward expects (..., dim={self.dim}) inputs, got shape {tuple(x.shape)}; pass the normed hidden states"
            )
        tokens = rearrange(x, "... d -> (...) d")  # (N, dim), N = B T
        routing = self.route(tokens)
        out, counts = self.run_experts(tokens, routing)
        if self.training:
            balance, z_loss = load_balance_loss(routing.logits, routing.experts), router_z_loss(routing.logits)
            self.aux_loss = self.aux_loss_weight * balance + self.z_loss_weight * z_loss
            self.record_metrics(balance, z_loss, counts)
        else:
            self.aux_loss, self.aux_metrics = None, {}
        return out.view_as(x)

    @torch.compiler.disable  # data-dependent group sizes: eager, so torch.compile does not recompile every step
    def run_experts(self, tokens: Tensor, routing: Routing) -> tuple[Tensor, list[int]]:
        """y = sum_i G(x)_i E_i(x) (Shazeer eq. 1) for tokens (N, dim) -> (N, dim), and the tokens per expert.

        The N k (token, expert) assignments are grouped by expert with one stable sort (slot s belongs to token
        s // k); each expert runs once on all of its tokens, whatever their number (dropless)."""
        out = torch.zeros_like(tokens)  # (N, dim)
        assigned_experts = rearrange(routing.experts, "n k -> (n k)")
        assigned_weights = rearrange(routing.weights, "n k -> (n k)")
        slots_by_expert = torch.argsort(assigned_experts, stable=True)  # (N k,)
        counts = torch.bincount(assigned_experts, minlength=self.n_experts).tolist()  # tokens per expert
        for expert, slots in zip(self.experts, torch.split(slots_by_expert, counts)):
            if slots.numel() == 0:
                continue
            token_index = slots // self.top_k  # (n_e,)
            expert_out = expert(tokens.index_select(0, token_index))  # E_i(x), (n_e, dim)
            weighted = expert_out * assigned_weights.index_select(0, slots)[:, None]  # G(x)_i E_i(x)
            out.index_add_(0, token_index, weighted.to(out.dtype))  # sum over each token's k experts
        return out, counts

    @torch.compiler.disable
    def record_metrics(self, balance: Tensor, z_loss: Tensor, counts: list[int]) -> None:
        load = torch.tensor(counts, dtype=torch.float32) * self.n_experts / max(sum(counts), 1)  # 1 = even
        self.aux_metrics = {
            "moe/load_balance": float(balance.detach()),
            "moe/z_loss": float(z_loss.detach()),
            "moe/load_max": float(load.max()),  # the busiest expert's share of the assignments times E
            "moe/load_min": float(load.min()),
        }

    def active_parameters(self) -> int:
        """Parameters one token uses: the router (E dim) and its top_k SwiGLU experts (3 dim hidden each)."""
        return self.gate.weight.numel() + self.top_k * 3 * self.dim * self.hidden_dim

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, top_k={self.top_k}, hidden_dim={self.hidden_dim}"


__all__ = ["MoEFeedForward", "Routing", "load_balance_loss", "router_z_loss"]
