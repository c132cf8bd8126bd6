"""RoPE: the real-arithmetic rotation equals the complex form (Meta) and the half layout (HF) after the
permutation; q_m . k_n depends only on m - n; the permutation equals the usual view/transpose recipe."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from x_llama.rope import (
    apply_rotary,
    apply_rotary_complex,
    apply_rotary_half,
    interleaved_tables,
    meta_to_half_permutation,
    permute_for_half,
    permute_for_interleaved,
    rope_cos_sin,
    rope_frequencies,
)


def test_real_rotation_equals_complex_multiplication():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 16)
    positions = torch.arange(11)
    cos, sin = interleaved_tables(*rope_cos_sin(11, 16))
    assert_close(apply_rotary(x, cos, sin), apply_rotary_complex(x, positions), atol=1e-6, rtol=0)
    # and the textbook pairwise formula
    c, s = rope_cos_sin(11, 16)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    textbook = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    assert_close(apply_rotary(x, cos, sin), textbook, atol=1e-6, rtol=0)


def test_interleaved_and_half_layouts_differ_by_the_permutation():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 5, 8)  # (B, H, T, d) in the interleaved layout
    positions = torch.arange(5) * 7
    permutation = meta_to_half_permutation(8)
    rotated_interleaved = apply_rotary_complex(x, positions)
    rotated_half = apply_rotary_half(x[..., permutation], positions)
    assert_close(rotated_half, rotated_interleaved[..., permutation], atol=1e-6, rtol=0)
    # without the permutation the two layouts disagree
    assert (apply_rotary_half(x, positions) - rotated_interleaved).abs().max() > 1e-2


def test_scores_depend_only_on_relative_position():
    torch.manual_seed(2)
    q, k = torch.randn(1, 32), torch.randn(1, 32)

    def score(m: int, n: int) -> torch.Tensor:
        return (apply_rotary_complex(q, torch.tensor([m])) * apply_rotary_complex(k, torch.tensor([n]))).sum()

    assert_close(score(5, 2), score(105, 102), atol=1e-4, rtol=0)
    assert_close(score(0, 0), (q * k).sum(), atol=1e-5, rtol=0)
    assert (score(5, 2) - score(5, 3)).abs() > 1e-3


def test_permutation_matches_view_transpose_recipe_and_inverts():
    torch.manual_seed(3)
    heads, head_dim, dim = 3, 8, 10
    w = torch.randn(heads * head_dim, dim)
    recipe = w.view(heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(heads * head_dim, dim)
    assert torch.equal(permute_for_half(w, heads), recipe)
    assert torch.equal(permute_for_interleaved(permute_for_half(w, heads), heads), w)


def test_angles_are_float32_and_start_at_zero():
    cos, sin = rope_cos_sin(4, 8, 10000.0)
    assert cos.dtype == torch.float32
    assert torch.equal(cos[0], torch.ones(4)) and torch.equal(sin[0], torch.zeros(4))
    assert_close(cos[1, 1], torch.cos(torch.tensor(10000.0 ** (-2 / 8))))


def test_frequencies_are_roformer_eq15_with_llama2_theta_by_default():
    """theta_i = 10000^(-2i/d) (RoFormer eq. 15; Llama 2's base), computed here in float64; a base off by one
    (9999 or 10001) moves the last frequency by ~1e-4 relative, far outside the tolerance."""
    expected = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert_close(rope_frequencies(16).double(), expected, rtol=2e-7, atol=0)
    assert_close(
        rope_frequencies(16, 500000.0).double(), 500000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16), rtol=2e-7, atol=0
    )
