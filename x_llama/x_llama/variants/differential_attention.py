"""Differential attention (Ye et al. 2024, "Differential Transformer", arXiv:2410.05258).

Attention scores of a softmax head spread some mass over irrelevant context ("attention noise"). The paper takes
the difference of two softmax maps, so that the noise both maps share cancels, as a differential amplifier
cancels common-mode noise (section 2.1, eq. 1), with X the layer input, d the head dimension of Q and K:

    [Q1; Q2] = X W^Q,   [K1; K2] = X W^K,   V = X W^V                          (Q_i, K_i: (T, d); V: (T, 2d))
    DiffAttn(X) = (softmax(Q1 K1^T / sqrt(d)) - lambda softmax(Q2 K2^T / sqrt(d))) V                   (eq. 1)

lambda is a learnable scalar, re-parameterised for smoother learning dynamics (eq. 2), with four learnable
vectors lambda_q1, lambda_k1, lambda_q2, lambda_k2 of size d per layer and a depth-dependent constant, for layer
l = 1 .. L:

    lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init                     (eq. 2)
    lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1))

Multi-head differential attention (section 2.2, eq. 3): h = H/2 differential heads share lambda within the layer;
each head's output (a 2d vector per token) is normalised on its own (RMSNorm over the head, the paper's
"GroupNorm", no gain) and scaled by (1 - lambda_init), which keeps the gradient flow close to softmax attention:

    head_i     = DiffAttn(X; W^Q_i, W^K_i, W^V_i, lambda)
    headbar_i  = (1 - lambda_init) RMSNorm(head_i)
    MultiHead(X) = Concat(headbar_1, ..., headbar_h) W^O                                              (eq. 3)

Layout (identical to transformers' `DiffLlamaAttention`, so its weights load one-to-one; hf parity tests):
`wq` gives H query heads of d: differential head i takes Q1 from query head i and Q2 from query head H/2 + i.
`wk` gives H_kv key heads: K1 is kv head j, K2 is kv head H_kv/2 + j, with j = i // (H / H_kv) (GQA groups
as in plain attention). `wv` gives H_kv value heads of d: the 2d-wide value of head i is the concatenation of
value heads j and H_kv/2 + j. Keys and values are therefore the ordinary (B, H_kv, S, d) tensors of
`model.Attention`, and the KV cache stores them unchanged.

Position: RoPE (when `inputs.cos` is given) rotates every query and key head, and an additive score bias
(ALiBi, `inputs.bias`, one per query head) is added to the map of the query head it belongs to; so map 1 of
differential head i reads bias head i and map 2 reads bias head H/2 + i (a choice of ours: the paper uses RoPE).

Computation: with head i's 2d-wide value V^(i) = [V_j; V_{H_kv/2+j}], A1 V^(i) and A2 V^(i) come from one call of
`axon_shared.layers.attention` over all H query heads (heads < H/2 give the A1 products, the others the A2 ones),
each softmax map computed exactly as in plain attention (same mask, causal order and bias); eq. 1 is then
A1 V^(i) - lambda A2 V^(i).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import Tensor, nn

from axon_shared.layers import attention

from ..config import LlamaConfig
from ..rope import apply_rotary

if TYPE_CHECKING:
    from ..model import AttentionInputs, KVCache


def lambda_init_schedule(layer_index: int) -> float:
    """lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1)) (section 2.1), l = layer_index + 1 in 1 .. L: 0.2 in the first
    layer, rising towards 0.8 with depth."""
    if layer_index < 0:
        raise ValueError(f"layer_index must be >= 0 (0 = the first layer), got {layer_index}")
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


def head_rms_norm(x: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last axis (one differential head's 2d channels), no gain: the paper's per-head GroupNorm
    (section 2.2). Normalised in float32, returned in x.dtype."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class DifferentialAttention(nn.Module):
    """Multi-head differential attention (eq. 1-3 of the module docstring), a drop-in for `model.Attention`:
    same projections (wq, wk, wv, wo), same forward contract, same KV cache."""

    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        if config.n_heads % 2 or config.kv_heads % 2:
            raise ValueError(
                f"differential attention pairs heads: n_heads={config.n_heads} and n_kv_heads={config.kv_heads} must both be even; "
                "choose even head counts (e.g. n_kv_heads=2)"
            )
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.norm_eps = config.norm_eps
        self.lambda_std = config.differential.lambda_std
        chosen = config.differential.lambda_init
        self.lambda_init = lambda_init_schedule(layer_index) if chosen is None else float(chosen)

        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)  # [Q1; Q2]: H heads of d
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)  # [K1; K2]: H_kv heads of d
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)  # V: H_kv/2 heads of 2d
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)  # W^O over H/2 heads of 2d
        self.wo.is_residual_projection = True  # initialised with a smaller std (Llama.reset_parameters)
        # eq. 2: the four vectors of the lambda re-parameterisation, shared by all heads of the layer
        self.lambda_q1 = nn.Parameter(torch.empty(self.head_dim))
        self.lambda_k1 = nn.Parameter(torch.empty(self.head_dim))
        self.lambda_q2 = nn.Parameter(torch.empty(self.head_dim))
        self.lambda_k2 = nn.Parameter(torch.empty(self.head_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The lambda vectors ~ N(0, lambda_std^2) (the paper's code); the Linear layers are left to the model."""
        for vector in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(vector, 0.0, self.lambda_std)

    def differential_lambda(self) -> Tensor:
        """lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init (eq. 2): a float32 scalar."""
        first = torch.exp(torch.dot(self.lambda_q1.float(), self.lambda_k1.float()))
        second = torch.exp(torch.dot(self.lambda_q2.float(), self.lambda_k2.float()))
        return first - second + self.lambda_init

    def forward(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None) -> Tensor:
        """x (B, T, dim) -> (B, T, dim). `inputs` carries RoPE tables or an additive bias, the padding mask and
        causal order (model.AttentionInputs); with a cache, the new keys/values are appended to it."""
        q = rearrange(self.wq(x), "b t (h d) -> b h t d", h=self.n_heads)  # (B, H, T, d): [Q1 heads; Q2 heads]
        k = rearrange(self.wk(x), "b t (h d) -> b h t d", h=self.n_kv_heads)  # (B, H_kv, T, d): [K1; K2]
        v = rearrange(self.wv(x), "b t (h d) -> b h t d", h=self.n_kv_heads)  # (B, H_kv, T, d)
        if inputs.cos is not None:
            q, k = apply_rotary(q, inputs.cos, inputs.sin), apply_rotary(k, inputs.cos, inputs.sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # (B, H_kv, S, d), S = cached + T

        # The 2d-wide value of each kv group j: [V_j; V_{H_kv/2 + j}], read by both maps (K1 heads and K2 heads).
        value_pairs = rearrange(v, "b (two g) s d -> b g s (two d)", two=2)  # (B, H_kv/2, S, 2d)
        shared_values = torch.cat((value_pairs, value_pairs), dim=1)  # (B, H_kv, S, 2d): kv head j -> pair j mod H_kv/2
        # Query head h reads kv head h // (H / H_kv): heads h < H/2 give A1 W, heads H/2 + i give A2 W.
        maps_times_values = attention(q, k, shared_values, inputs.mask, is_causal=inputs.is_causal, bias=inputs.bias)  # (B, H, T, 2d)
        first, second = rearrange(maps_times_values, "b (two h) t e -> two b h t e", two=2)  # (B, H/2, T, 2d) each

        heads = first - self.differential_lambda().to(first.dtype) * second  # eq. 1, (B, H/2, T, 2d)
        heads = (1.0 - self.lambda_init) * head_rms_norm(heads, self.norm_eps)  # eq. 3
        return self.wo(rearrange(heads, "b h t e -> b t (h e)"))
