"""axon_shared.layers against torch references and direct computations."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from axon_shared.layers import attention, causal_mask, padding_mask, sinusoidal_embedding


def test_sinusoidal_interleaved_matches_paper_formula():
    # Vaswani et al. 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)
    d, positions = 16, torch.arange(50)
    pe = sinusoidal_embedding(positions, d)
    expected = torch.zeros(50, d)
    for pos in range(50):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            expected[pos, 2 * i], expected[pos, 2 * i + 1] = math.sin(angle), math.cos(angle)
    assert_close(pe, expected, atol=1e-5, rtol=0)


def test_sinusoidal_concat_matches_diffusers_ddpm_embedding():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 500, 999])
    ours = sinusoidal_embedding(t, 128, layout="concat", freq_shift=1)
    theirs = get_timestep_embedding(t, 128, flip_sin_to_cos=False, downscale_freq_shift=1)
    assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_sinusoidal_rejects_bad_input():
    with pytest.raises(ValueError, match="even"):
        sinusoidal_embedding(torch.arange(3), 7)
    for dim in (0, -2):
        with pytest.raises(ValueError, match="positive even"):
            sinusoidal_embedding(torch.arange(3), dim)
    for positions in (torch.zeros(2, 2), torch.tensor(3)):  # 2-D and 0-D
        with pytest.raises(ValueError, match="1-D"):
            sinusoidal_embedding(positions, 8)
    for layout in ("alternating", "zigzag"):  # sorting before and after "interleaved"
        with pytest.raises(ValueError, match="layout must be"):
            sinusoidal_embedding(torch.arange(3), 8, layout=layout)


def explicit_attention(q, k, v, mask):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


def test_attention_matches_explicit_softmax_with_causal_and_padding():
    torch.manual_seed(0)
    B, H, T, D = 2, 4, 6, 8
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    tokens = torch.tensor([[5, 6, 7, 8, 9, 3], [5, 6, 7, 0, 0, 0]])
    mask = padding_mask(tokens, pad_id=0)
    out = attention(q, k, v, mask, is_causal=True)
    full = mask & causal_mask(T)
    assert_close(out, explicit_attention(q, k, v, full), atol=1e-5, rtol=1e-5)


def test_attention_grouped_heads_equal_repeated_kv():
    torch.manual_seed(0)
    q = torch.randn(2, 8, 5, 4)
    k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    ours = attention(q, k, v, is_causal=True)
    # consecutive query heads share a kv head: head h reads kv head h // 4
    k_rep, v_rep = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
    assert_close(ours, explicit_attention(q, k_rep, v_rep, causal_mask(5)), atol=1e-5, rtol=1e-5)


def test_attention_with_cache_offsets_causal_mask():
    torch.manual_seed(0)
    q_all, k, v = torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4)
    full = attention(q_all, k, v, is_causal=True)
    last_two = attention(q_all[:, :, -2:], k, v, is_causal=True)  # decoding the last 2 positions with a cache
    assert_close(last_two, full[:, :, -2:], atol=1e-6, rtol=1e-6)
    # one query against 4 cached keys, with as many heads as keys, then as many batch rows: the query sees every key
    for q_shape, kv_shape in (((1, 4, 1, 8), (1, 4, 4, 8)), ((4, 2, 1, 8), (4, 2, 4, 8))):
        q, k, v = torch.randn(q_shape), torch.randn(kv_shape), torch.randn(kv_shape)
        expected = explicit_attention(q, k, v, torch.ones(1, 4, dtype=torch.bool))
        assert_close(attention(q, k, v, is_causal=True), expected, atol=1e-6, rtol=1e-6)


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    E, H = 16, 4
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
    x = torch.randn(3, 5, E)
    key_padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    expected, _ = mha(x, x, x, key_padding_mask=key_padding)
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    split = lambda t: t.view(3, 5, H, E // H).transpose(1, 2)
    q, k, v = split(F.linear(x, w_q, b_q)), split(F.linear(x, w_k, b_k)), split(F.linear(x, w_v, b_v))
    out = attention(q, k, v, mask=~key_padding[:, None, None, :])
    out = mha.out_proj(out.transpose(1, 2).reshape(3, 5, E))
    assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_stay_finite():
    q = k = v = torch.randn(1, 1, 3, 4)
    mask = torch.tensor([[False, False, False], [True, False, False], [True, True, False]])
    assert torch.isfinite(attention(q, k, v, mask)).all()


def test_attention_rejects_float_masks_and_bad_heads():
    q = torch.randn(1, 3, 2, 4)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention(q, torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))
    with pytest.raises(TypeError, match="boolean"):
        attention(q, q, q, mask=torch.zeros(2, 2))
    for bad in (torch.randn(3, 2, 4), torch.randn(1, 1, 3, 2, 4)):  # 3 and 5 dimensions, as q, as k and as v
        for args in ((bad, q, q), (q, bad, q), (q, q, bad)):
            with pytest.raises(ValueError, match=r"must be \(B, H, T, D\)"):
                attention(*args)


def attention_cases():
    """(q, k, v, mask, is_causal): causal, causal + padding, grouped kv heads, and a cache (4 queries, 7 keys)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)
    padding = padding_mask(torch.tensor([[5, 6, 7, 8, 9, 3], [5, 6, 7, 0, 0, 0]]), pad_id=0)
    return {
        "causal": (r(2, 4, 6, 8), r(2, 4, 6, 8), r(2, 4, 6, 8), None, True),
        "causal+padding": (r(2, 4, 6, 8), r(2, 4, 6, 8), r(2, 4, 6, 8), padding, True),
        "gqa": (r(2, 8, 5, 4), r(2, 2, 5, 4), r(2, 2, 5, 4), None, True),
        "cache": (r(1, 4, 4, 8), r(1, 2, 7, 8), r(1, 2, 7, 8), None, True),
        "padding only": (r(2, 4, 6, 8), r(2, 4, 6, 8), r(2, 4, 6, 8), padding, False),
    }


@pytest.mark.parametrize("case", list(attention_cases()))
def test_compiled_attention_equals_eager(case):
    """Inside a compiled graph on the CPU `attention` takes its matmul path (attention_by_matmul): same numbers as
    the eager F.scaled_dot_product_attention path, for every mask and head layout the models use."""
    q, k, v, mask, is_causal = attention_cases()[case]
    eager = attention(q, k, v, mask, is_causal=is_causal)
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, mask, is_causal=is_causal), fullgraph=True)(q, k, v)
    assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_attention_by_matmul_is_the_explicit_formula():
    from axon_shared.layers import attention_by_matmul

    q, k, v, _, _ = attention_cases()["gqa"]
    expected = explicit_attention(q, k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1), causal_mask(5))
    assert_close(attention_by_matmul(q, k, v, is_causal=True), expected, atol=1e-5, rtol=1e-5)
    q, k, v, mask, _ = attention_cases()["padding only"]
    assert_close(attention_by_matmul(q, k, v, mask), explicit_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_sinusoidal_accepts_every_even_dim_and_rejects_every_odd_one():
    # dims 2 mod 4 (6, 10) are even; 5 and 9 are odd: a parity check by `dim & 2` gets all four wrong
    for dim in (2, 6, 10):
        assert sinusoidal_embedding(torch.arange(3), dim).shape == (3, dim)
    for dim in (1, 5, 9):
        with pytest.raises(ValueError, match="even"):
            sinusoidal_embedding(torch.arange(3), dim)


@pytest.mark.parametrize("by_matmul", [False, True])
def test_attention_adds_a_float_bias_to_the_scores(by_matmul):
    """softmax(q k^T / sqrt(d) + bias) v where the mask allows (ALiBi's and the differential attention's form), through
    the SDPA path and the compiled path's matmul formula: alone, with a causal flag and with a padding mask."""
    from axon_shared.layers import attention_by_matmul

    torch.manual_seed(0)
    B, H, T, D = 2, 4, 5, 8
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    bias = 3 * torch.randn(1, H, T, T)  # large enough that dropping it changes every row
    padding = padding_mask(torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 0, 0]]), pad_id=0)  # (B, 1, 1, T)
    function = attention_by_matmul if by_matmul else attention
    for mask, is_causal in ((None, False), (None, True), (padding, False)):
        allowed = causal_mask(T) if is_causal else torch.ones(T, T, dtype=torch.bool) if mask is None else padding
        scores = q @ k.transpose(-1, -2) / math.sqrt(D) + bias
        expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v
        assert_close(function(q, k, v, mask, is_causal=is_causal, bias=bias), expected, atol=1e-5, rtol=1e-5)
        without = function(q, k, v, mask, is_causal=is_causal)
        assert (without - expected).abs().amax() > 0.1


def test_padding_mask_is_true_exactly_off_the_pad_id():
    tokens = torch.tensor([[5, 0, 3, 0], [2, 7, 3, 3]])
    assert padding_mask(tokens, pad_id=0).tolist() == [[[[True, False, True, False]]], [[[True, True, True, True]]]]
    # a pad id in the middle of the vocabulary: ids below and above it are real tokens
    assert padding_mask(tokens, pad_id=3).tolist() == [[[[True, True, False, True]]], [[[True, True, False, False]]]]


def test_causal_attention_with_more_queries_than_keys_is_refused():
    """Causal attention aligns the last query with the last key (a cache holds the earlier keys); more queries than
    keys has no such alignment and is refused, with or without a mask, instead of SDPA's top-left causal mask."""
    q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 3, 4)
    for mask in (None, torch.ones(1, 1, 1, 3, dtype=torch.bool)):
        with pytest.raises(ValueError, match="n_keys >= n_queries"):
            attention(q, k, k, mask, is_causal=True)


def test_padding_mask_refuses_tokens_that_are_not_batch_by_length():
    for tokens in (torch.tensor([1, 2, 0]), torch.ones(2, 3, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"tokens must be \(B, S\)"):
            padding_mask(tokens, pad_id=0)


def test_dropout_keeps_each_element_independently_with_probability_1_minus_p():
    """The statistics of inverted dropout on 4M elements (deterministic: seeded): the kept fraction is 1 - p within
    5 binomial standard deviations, kept elements are x / (1 - p), the others 0, so the mean is unbiased; the four
    16-bit numbers of one 64-bit draw (neighbouring elements) are uncorrelated; eval mode and p = 0 are the identity."""
    from axon_shared.layers import Dropout, dropout

    n, p = 1 << 22, 0.05
    x = torch.full((n // 1024, 1024), 3.0)
    torch.manual_seed(0)
    y = dropout(x, p)
    kept = y != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    assert torch.equal(y[kept], torch.full_like(y[kept], 3.0 * (1.0 / (1.0 - round(p * 65536) / 65536))))
    assert abs(y.double().mean().item() - 3.0) < 5 * 3.0 * (p / (1 - p) / n) ** 0.5
    flat = kept.flatten().double()
    for lag in (1, 2, 3, 4):  # within one draw (1-3) and across draws (4)
        corr = torch.corrcoef(torch.stack([flat[:-lag], flat[lag:]]))[0, 1].item()
        assert abs(corr) < 5 / n**0.5, (lag, corr)
    for q in (0.1, 0.5, 0.9):  # other rates, and a bfloat16 input
        torch.manual_seed(1)
        kept_q = (dropout(x[:256].bfloat16(), q) != 0).double().mean().item()
        assert abs(kept_q - (1 - q)) < 5 * (q * (1 - q) / x[:256].numel()) ** 0.5, q
    torch.manual_seed(0)
    assert torch.equal(dropout(x, p), y)  # torch.manual_seed governs it
    assert not torch.equal(dropout(x, p), y)  # and it draws from the generator
    module = Dropout(p).eval()
    assert module(x) is x and dropout(x, 0.0) is x and dropout(x, p, training=False) is x
    assert torch.equal(dropout(x[:4], 1.0), torch.zeros_like(x[:4]))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        Dropout(1.5)


def test_dropout_gradient_is_the_mask_over_1_minus_p():
    from axon_shared.layers import dropout

    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x, 0.3)
    y.sum().backward()
    kept = y.detach() != 0
    assert 0 < kept.sum() < x.numel()
    assert torch.equal(x.grad, kept.float() / (1 - round(0.3 * 65536) / 65536))
