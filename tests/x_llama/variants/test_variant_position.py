"""Position variants: ALiBi (Press et al. 2022) against transformers' BLOOM, NoPE's permutation invariance, and the
cached/padded paths of both."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from axon_shared.layers import attention, attention_by_matmul, causal_mask
from x_llama.config import LlamaConfig
from x_llama.model import Llama
from x_llama.variants.alibi import alibi_bias, alibi_slopes


@pytest.mark.parametrize("n_heads", [1, 2, 3, 4, 5, 6, 8, 12, 16, 20])
def test_alibi_bias_equals_bloom(n_heads):
    """BLOOM adds m_h * j to the scores of key j (`build_alibi_tensor`); ours adds -m_h (i - j). They differ by -m_h i,
    a constant per query row that the softmax ignores, so ours + m_h i must equal BLOOM's exactly: this checks the
    slopes (including the rule for head counts that are not powers of 2) and the sign and form of the bias."""
    length = 11
    bloom = build_alibi_tensor(torch.ones(1, length), n_heads, torch.float32)  # (H, 1, S): m_h * j
    slopes = alibi_slopes(n_heads)
    positions = torch.arange(length)[None]
    ours = alibi_bias(slopes, positions, positions)[0]  # (H, T, S): -m_h (i - j)
    row_constant = slopes[:, None, None] * torch.arange(length)[None, :, None]  # m_h i
    assert_close(ours + row_constant, bloom.expand(n_heads, length, length), rtol=0, atol=1e-6)


def test_alibi_slopes_of_the_paper():
    """Section 3: for 8 heads the slopes are 1/2, 1/4, ..., 1/256."""
    assert_close(alibi_slopes(8), torch.tensor([2.0**-k for k in range(1, 9)]))


@pytest.mark.parametrize("by_matmul", [False, True])
def test_attention_adds_the_bias_inside_the_softmax(by_matmul):
    """softmax(q k^T / sqrt(d) + bias) v with the causal mask, written out, against both attention paths (SDPA in
    eager mode, the matmul form inside compiled graphs), with grouped kv heads."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    bias = alibi_bias(alibi_slopes(4), torch.arange(7)[None], torch.arange(7)[None])
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, dim=1)) / 8**0.5 + bias
    scores = scores.masked_fill(~causal_mask(7), float("-inf"))
    expected = torch.softmax(scores, -1) @ v.repeat_interleave(2, dim=1)
    if by_matmul:
        out = attention_by_matmul(q, k, v, causal_mask(7), bias=bias)
    else:
        out = attention(q, k, v, is_causal=True, bias=bias)
    assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _model(position: str, **overrides) -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig.from_preset("tiny", position=position, **overrides)).eval()


@pytest.mark.parametrize("position", ["alibi", "nope"])
def test_cached_decoding_and_left_padding_match_the_full_forward(position):
    """Prefill + one token at a time equals the uncached forward; a left-padded row gives the logits of the same row
    unpadded (ALiBi's distances are slot distances: this fails if pads counted as distance)."""
    model = _model(position)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    cache = model.new_cache(2, 32)
    steps = [model(tokens[:, :9], cache=cache)] + [model(tokens[:, t : t + 1], cache=cache) for t in range(9, 16)]
    assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)

    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), tokens[:1, :11]], 1)  # 5 pads, then 11 real tokens
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 11)], 1)
    assert_close(model(padded, attention_mask=mask)[:, 5:], full[:1, :11], rtol=1e-5, atol=1e-5)
    cache = model.new_cache(1, 32)
    prefill = model(padded, attention_mask=mask, cache=cache)
    step = model(tokens[:1, 11:12], cache=cache)
    assert_close(torch.cat([prefill[:, 5:], step], 1), full[:1, :12], rtol=1e-5, atol=1e-5)


def test_nope_last_output_ignores_the_order_of_earlier_tokens():
    """Kazemnejad et al. 2023: without position signal a causal model's output at the last position is a function of
    the *set* of earlier tokens. RoPE and ALiBi break this (checked too, so the test can fail)."""
    tokens = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    permuted = torch.cat([tokens[:, :-1][:, torch.randperm(11, generator=torch.Generator().manual_seed(3))], tokens[:, -1:]], 1)
    for position, invariant in (("nope", True), ("rope", False), ("alibi", False)):
        model = _model(position, n_layers=1)
        last, last_permuted = model(tokens)[0, -1], model(permuted)[0, -1]
        assert torch.allclose(last, last_permuted, atol=1e-5) == invariant, position


def test_alibi_evaluates_beyond_the_training_length():
    """ALiBi and NoPE have no table: a model evaluates at any length up to max_seq_len (the ablation's 2x and 4x);
    RoPE's table also covers max_seq_len, so the three differ only in what they learned."""
    model = _model("alibi", max_seq_len=512)
    logits = model(torch.randint(0, 512, (1, 500)))
    assert logits.shape == (1, 500, 512) and torch.isfinite(logits).all()
