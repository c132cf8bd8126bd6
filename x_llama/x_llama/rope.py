"""Rotary position embedding (Su et al. 2021, "RoFormer", section 3.2-3.4), as used by Llama 2.

Head dimension d is split into d/2 planes; plane i rotates by the angle m * theta_i at position m, with
theta_i = base^(-2i/d) (RoFormer eq. 15). Then q_m . k_n depends only on m - n (README, "RoPE").

Two layouts of the planes exist (README, "The two layouts"):
- "interleaved" (Meta's reference code, RoFormer eq. 34): plane i = dimensions (2i, 2i+1), i.e. the complex number
  x_{2i} + i x_{2i+1} multiplied by e^{i m theta_i}. x_llama uses this layout, so its weights are Meta's weights.
- "half" (Hugging Face `rotate_half`): plane i = dimensions (i, i + d/2).
`meta_to_half_permutation` maps one onto the other; `permute_for_half` / `permute_for_interleaved` apply it
to the rows of W_q / W_k.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor


def rope_frequencies(head_dim: int, theta: float = 10000.0, device=None) -> Tensor:
    """theta_i = theta^(-2i/d) for i = 0 .. d/2 - 1 (RoFormer eq. 15), in float32: (d/2,)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (theta**exponents)


def rope_cos_sin(max_positions: int, head_dim: int, theta: float = 10000.0, device=None) -> tuple[Tensor, Tensor]:
    """cos(m theta_i), sin(m theta_i) for m = 0 .. max_positions-1: two (max_positions, d/2) float32 tables.

    The angles m * theta_i are formed in float32 (in bf16, position 1000 would be off by up to 4 whole units)."""
    positions = torch.arange(max_positions, dtype=torch.float32, device=device)
    angles = torch.outer(positions, rope_frequencies(head_dim, theta, device))  # (M, d/2)
    return angles.cos(), angles.sin()


def interleaved_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """(M, d/2) cos/sin -> (M, d) tables for `apply_rotary`: [c0, c0, c1, c1, ...] and [-s0, s0, -s1, s1, ...]."""
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each plane (x_{2i}, x_{2i+1}) by the angle m theta_i (interleaved layout, RoFormer eq. 34):

        y_{2i}   = x_{2i} cos - x_{2i+1} sin
        y_{2i+1} = x_{2i} sin + x_{2i+1} cos        (= (x_{2i} + i x_{2i+1}) e^{i m theta_i})

    computed as y = x * [c0, c0, ...] + swap(x) * [-s0, s0, ...] with swap exchanging each pair, which needs
    3 element-wise kernels. x: (B, H, T, d); cos, sin from `interleaved_tables`, broadcastable to x
    ((T, d) or (B, 1, T, d)), float32. Computed in float32, returned in x.dtype.
    """
    x32 = x.float()
    pairs = x32.unflatten(-1, (-1, 2))
    swapped = torch.stack((pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    return torch.addcmul(x32 * cos, swapped, sin).type_as(x)


def apply_rotary_complex(x: Tensor, positions: Tensor, theta: float = 10000.0) -> Tensor:
    """The same rotation in complex arithmetic, as in Meta's reference: (x_{2i} + i x_{2i+1}) * e^{i m theta_i}.

    Slower; kept as the readable definition and tested against `apply_rotary`. x: (..., T, d); positions: (T,).
    """
    freqs = torch.outer(positions.float(), rope_frequencies(x.shape[-1], theta, x.device))
    rotors = torch.polar(torch.ones_like(freqs), freqs)  # e^{i m theta_i}: (T, d/2)
    as_complex = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(as_complex * rotors).flatten(-2).type_as(x)


def apply_rotary_half(x: Tensor, positions: Tensor, theta: float = 10000.0) -> Tensor:
    """The rotation in the "half" layout (plane i = dims (i, i + d/2)), as Hugging Face computes it."""
    freqs = torch.outer(positions.float(), rope_frequencies(x.shape[-1], theta, x.device))
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    first, second = x.float().chunk(2, dim=-1)
    rotate_half = torch.cat((-second, first), dim=-1)
    return (x.float() * cos + rotate_half * sin).type_as(x)


def meta_to_half_permutation(head_dim: int) -> Tensor:
    """Index p with half[j] = interleaved[p[j]]: half-layout dim j < d/2 is plane j's first coordinate (2j),
    dim j + d/2 its second (2j + 1). So p = [0, 2, 4, ..., d-2, 1, 3, ..., d-1]."""
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


def permute_for_half(weight: Tensor, n_heads: int) -> Tensor:
    """Rows of W_q (n_heads) or W_k (n_kv_heads!) from the interleaved (Meta) to the half (HF) layout, per head:
    row 2j + c of a head (plane j, coordinate c) moves to row c * d/2 + j (`meta_to_half_permutation`)."""
    return rearrange(weight, "(h half two) dim -> (h two half) dim", h=n_heads, two=2)


def permute_for_interleaved(weight: Tensor, n_heads: int) -> Tensor:
    """Inverse of `permute_for_half`: rows of W_q / W_k from the HF layout back to Meta's."""
    return rearrange(weight, "(h two half) dim -> (h half two) dim", h=n_heads, two=2)
