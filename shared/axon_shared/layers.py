"""Layers used by two or more Axon packages.

- `sinusoidal_embedding`: the Transformer's positional encoding (Vaswani et al. 2017, section 3.5) and DDPM's
  timestep embedding (Ho et al. 2020, appendix B) are the same function with two layouts.
- `attention`: scaled dot-product attention (Vaswani et al., eq. 1) over `F.scaled_dot_product_attention`,
  with grouped key/value heads (Ainslie et al. 2023).
- `Dropout`: inverted dropout (Srivastava et al. 2014), the transformer's regulariser (Vaswani et al. 5.4) and
  DDPM's (Ho et al. appendix B), with a cheaper random source on the CPU.

Mask convention (one for the whole project): a boolean tensor broadcastable to (B, H, T_q, T_k) where
**True means "may attend"**, exactly as `F.scaled_dot_product_attention` reads a boolean `attn_mask`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor, nn


def sinusoidal_embedding(
    positions: Tensor,
    dim: int,
    *,
    max_period: float = 10_000.0,
    layout: Literal["interleaved", "concat"] = "interleaved",
    freq_shift: float = 0.0,
) -> Tensor:
    """Sinusoids of geometrically spaced frequencies: positions (N,) -> (N, dim), computed in float32.

    Frequency i (of dim/2) is  w_i = max_period^(-i / (dim/2 - freq_shift)).
    - Transformer PE (Vaswani et al. 3.5): PE[pos, 2i] = sin(pos w_i), PE[pos, 2i+1] = cos(pos w_i):
      `layout="interleaved", freq_shift=0`.
    - DDPM timestep embedding (the original TF code, diffusers' `flip_sin_to_cos=False, freq_shift=1`):
      [sin(t w_0..), cos(t w_0..)]: `layout="concat", freq_shift=1`.
    """
    if positions.ndim != 1:
        raise ValueError(f"positions must be 1-D (N,), got shape {tuple(positions.shape)}")
    if dim <= 0 or dim % 2:
        raise ValueError(f"dim must be a positive even number, got {dim}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=positions.device)
    frequencies = torch.exp(exponent / (half - freq_shift))  # (half,)
    angles = positions.float()[:, None] * frequencies[None, :]  # (N, half)
    if layout == "concat":
        return torch.cat([angles.sin(), angles.cos()], dim=-1)
    if layout == "interleaved":
        return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)  # sin, cos, sin, cos, ...
    raise ValueError(f"layout must be 'interleaved' or 'concat', got {layout!r}")


def causal_mask(n_queries: int, n_keys: int | None = None, *, device=None) -> Tensor:
    """(T_q, T_k) boolean mask, True where query i may see key j.

    With a KV cache the queries are the *last* T_q of T_k positions: query i sits at position
    T_k - T_q + i and sees keys j <= that position.
    """
    n_keys = n_queries if n_keys is None else n_keys
    if n_keys < n_queries:
        raise ValueError(f"causal_mask needs n_keys >= n_queries, got {n_keys} < {n_queries}")
    query_pos = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]
    key_pos = torch.arange(n_keys, device=device)[None, :]
    return key_pos <= query_pos


def padding_mask(tokens: Tensor, pad_id: int) -> Tensor:
    """(B, S) tokens -> (B, 1, 1, S) boolean mask, True at real (non-pad) keys."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (B, S), got shape {tuple(tokens.shape)}")
    return (tokens != pad_id)[:, None, None, :]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    bias: Tensor | None = None,
) -> Tensor:
    """softmax(q k^T / sqrt(d_k) + bias + mask) v  (Vaswani et al., eq. 1), with grouped kv heads.

    q: (B, H, T_q, D); k, v: (B, H_kv, T_k, D) with H divisible by H_kv. Query head h reads kv head
    h // (H / H_kv): consecutive query heads share a kv head (GQA; H_kv = 1 is MQA, H_kv = H is MHA).
    mask: boolean, broadcastable to (B, H, T_q, T_k), True = may attend. A query row with no key allowed
    (e.g. a left-pad position) would give NaN; such rows are let attend everywhere instead, and their
    outputs are meaningless but finite: callers must ignore them.
    bias: float, broadcastable to (B, H, T_q, T_k), added to the scaled scores (ALiBi, x_llama.variants.alibi).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    if n_heads % n_kv_heads:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of kv heads ({n_kv_heads})")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be boolean (True = may attend), got {mask.dtype}")
        if is_causal:
            mask = mask & causal_mask(q.shape[-2], k.shape[-2], device=q.device)
            is_causal = False
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    elif is_causal and (q.shape[-2] != k.shape[-2] or bias is not None):
        mask, is_causal = causal_mask(q.shape[-2], k.shape[-2], device=q.device), False
    if torch.compiler.is_compiling() and q.device.type == "cpu" and dropout_p == 0.0:
        return attention_by_matmul(q, k, v, mask, is_causal=is_causal, bias=bias)
    if bias is not None:  # one additive float mask: the bias where allowed, -inf elsewhere
        bias = bias.to(q.dtype)
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=n_heads != n_kv_heads
    )


def attention_by_matmul(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *, is_causal: bool = False, bias: Tensor | None = None
) -> Tensor:
    """Equation 1 written out, softmax(q k^T / sqrt(d_k) + mask) v, with the softmax in float32: what `attention` runs
    inside a compiled graph on the CPU. Inductor fuses the scale, mask and softmax around two batched matmuls, which
    beats the CPU flash-attention kernel there: x_llama `cpu` preset, bf16 compiled training, 9,700 against 5,800
    tokens/s (benchmarks/x_llama_bench.py). Same arguments as `attention` (mask already made safe for empty rows)."""
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    if n_heads != n_kv_heads:  # query head h reads kv head h // g
        k = repeat(k, "b h s d -> b (h g) s d", g=n_heads // n_kv_heads)
        v = repeat(v, "b h s d -> b (h g) s d", g=n_heads // n_kv_heads)
    if is_causal:
        mask = causal_mask(q.shape[-2], k.shape[-2], device=q.device)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5  # (B, H, T_q, T_k)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores.float(), dim=-1).to(v.dtype), v)


# 16-bit random numbers: a drop probability p is rounded to a multiple of 1 / 65536 (0.05 -> 0.0500031)
_DROPOUT_LEVELS = 1 << 16


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout: each element is zeroed with probability p and the others are scaled by 1 / (1 - p), so
    E[dropout(x)] = x; identity when not training (Srivastava et al. 2014).

    `F.dropout` on the CPU draws one 32-bit Mersenne-Twister number per element from the generator, serially,
    whatever the number of threads (12.8% of a transformer `cpu`-preset training step, 17 calls). Here one 64-bit draw
    (`random_` over the full int64 range, torch's own generator, so `torch.manual_seed` and checkpointed RNG states
    govern it as before) gives four independent uniform 16-bit numbers u, and an element is kept when
    u >= round(65536 p); benchmarks/transformer_bench.py measures the gain (shared/README.md). The deviation: p is
    used rounded to a multiple of 1/65536.
    On other devices and inside a compiled graph (whose random numbers are already cheap) this is `F.dropout`."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    threshold = round(p * _DROPOUT_LEVELS)
    if x.device.type != "cpu" or torch.compiler.is_compiling() or not 0 < threshold < _DROPOUT_LEVELS:
        return F.dropout(x, p, training=True)
    draws = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # the full 64-bit range
    uniform16 = draws.view(torch.int16)[: x.numel()].view(x.shape)  # four uniform numbers in [-32768, 32767] per draw
    keep = uniform16 >= threshold - _DROPOUT_LEVELS // 2  # P(keep) = 1 - threshold / 65536
    return torch.where(keep, x * (1.0 / (1.0 - threshold / _DROPOUT_LEVELS)), 0.0)


class Dropout(nn.Module):
    """`nn.Dropout` with `dropout` above: the same module (train / eval), a cheaper random source on the CPU."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
