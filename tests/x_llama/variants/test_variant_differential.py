"""Differential attention (Ye et al. 2024; x_llama.variants.differential_attention) against transformers'
`DiffLlamaAttention` (outputs and gradients, with RoPE, without position, with an ALiBi bias, MHA and GQA, padding,
several depths), the lambda_init schedule, the lambda initialisation, and cached decoding through `Llama`."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close
from transformers.models.diffllama.configuration_diffllama import DiffLlamaConfig
from transformers.models.diffllama.modeling_diffllama import DiffLlamaAttention, DiffLlamaRotaryEmbedding

from x_llama import Llama, LlamaConfig
from x_llama.model import AttentionInputs
from x_llama.rope import interleaved_tables, permute_for_interleaved, rope_cos_sin
from x_llama.variants.alibi import alibi_bias, alibi_slopes
from x_llama.variants.differential_attention import DifferentialAttention, lambda_init_schedule

DIM, MAX_LEN, EPS, THETA = 64, 32, 1e-5, 10000.0


def reference_attention(n_heads: int, n_kv_heads: int, layer_index: int, seed: int = 0) -> DiffLlamaAttention:
    """A random HF DiffLlamaAttention (eager). lambda_std_dev 0.3 so that lambda is well away from lambda_init and
    the two exp terms differ (with the paper's 0.1 a sign error in eq. 2 would hide under the tolerance)."""
    torch.manual_seed(seed)
    config = DiffLlamaConfig(
        hidden_size=DIM,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        rms_norm_eps=EPS,
        max_position_embeddings=MAX_LEN,
        rope_parameters={"rope_type": "default", "rope_theta": THETA},
        lambda_std_dev=0.3,
        attn_implementation="eager",
    )
    return DiffLlamaAttention(config, layer_idx=layer_index).eval()


def ours_from_reference(reference: DiffLlamaAttention, layer_index: int) -> DifferentialAttention:
    """The same weights in x_llama's layout: W_q, W_k rows back to Meta's interleaved RoPE layout (as x_llama.hf)."""
    hf = reference.config
    config = LlamaConfig(
        dim=DIM,
        n_layers=8,
        n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads,
        norm_eps=EPS,
        max_seq_len=MAX_LEN,
        attention="differential",
    )
    ours = DifferentialAttention(config, layer_index).eval()
    with torch.no_grad():
        ours.wq.weight.copy_(permute_for_interleaved(reference.q_proj.weight, config.n_heads))
        ours.wk.weight.copy_(permute_for_interleaved(reference.k_proj.weight, config.kv_heads))
        ours.wv.weight.copy_(reference.v_proj.weight)
        ours.wo.weight.copy_(reference.o_proj.weight)
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            getattr(ours, name).copy_(getattr(reference, name))
    return ours


def interleaved_rope(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our RoPE tables at per-row positions (B, T): (B, 1, T, d) each."""
    cos, sin = interleaved_tables(*rope_cos_sin(MAX_LEN, head_dim, THETA))
    return cos[positions][:, None], sin[positions][:, None]


def additive_mask(real: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """HF's eager mask: (B, 1 or H, T, T) float, 0 (plus the bias) where causal and real, the float minimum elsewhere
    (as HF builds it: a pad query row then stays finite, so no NaN reaches the gradients)."""
    length = real.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril() & real[:, None, None, :]  # (B, 1, T, T)
    scores = torch.zeros(allowed.shape) if bias is None else bias.expand(real.shape[0], -1, -1, -1).clone()
    return scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)


CASES = [  # (n_heads, n_kv_heads, layer_index)
    pytest.param(4, 4, 0, id="MHA-layer0"),
    pytest.param(4, 2, 3, id="GQA-layer3"),
    pytest.param(8, 4, 1, id="GQA-kv4-layer1"),
    pytest.param(8, 2, 7, id="GQA4-layer7"),
]


@pytest.mark.parametrize("position", ["rope", "nope", "alibi"])
@pytest.mark.parametrize(("n_heads", "n_kv_heads", "layer_index"), CASES)
def test_matches_transformers_diffllama(n_heads, n_kv_heads, layer_index, position):
    """Outputs and gradients (of the four lambda vectors, W_v, W_o and W_q) equal DiffLlamaAttention's on a causal
    self-attention over a left-padded batch. nope gives HF the identity rotation (cos 1, sin 0); alibi gives HF the
    bias inside its additive mask, one per query head."""
    reference = reference_attention(n_heads, n_kv_heads, layer_index)
    ours = ours_from_reference(reference, layer_index)
    head_dim = DIM // n_heads
    batch, length = 2, 12
    x = torch.randn(batch, length, DIM, generator=torch.Generator().manual_seed(1))
    real = torch.ones(batch, length, dtype=torch.bool)
    real[1, :4] = False  # row 1 is left-padded by 4
    positions = (real.long().cumsum(1) - 1).clamp(min=0)  # (B, T)

    hf_cos, hf_sin = DiffLlamaRotaryEmbedding(reference.config)(x, positions)
    cos = sin = bias = None
    if position == "rope":
        cos, sin = interleaved_rope(positions, head_dim)
    else:
        hf_cos, hf_sin = torch.ones_like(hf_cos), torch.zeros_like(hf_sin)
    if position == "alibi":
        bias = alibi_bias(alibi_slopes(n_heads), positions, positions)  # (B, H, T, T)
    inputs = AttentionInputs(cos, sin, real[:, None, None, :], True, bias)

    x_ours, x_hf = x.clone().requires_grad_(), x.clone().requires_grad_()
    actual = ours(x_ours, inputs, None)
    expected, _ = reference(x_hf, (hf_cos, hf_sin), additive_mask(real, bias))
    # left-pad query rows see no key at all: their outputs are meaningless on both sides (axon_shared.layers.attention)
    assert_close(actual[real], expected[real], atol=1e-5, rtol=1e-5)

    weights = torch.randn(actual.shape, generator=torch.Generator().manual_seed(2)) * real[..., None]
    (actual * weights).sum().backward()
    (expected * weights).sum().backward()
    assert_close(x_ours.grad, x_hf.grad, atol=1e-5, rtol=1e-5)
    for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
        assert_close(getattr(ours, name).grad, getattr(reference, name).grad, atol=1e-5, rtol=1e-5)
    assert_close(ours.wv.weight.grad, reference.v_proj.weight.grad, atol=1e-5, rtol=1e-5)
    assert_close(ours.wo.weight.grad, reference.o_proj.weight.grad, atol=1e-5, rtol=1e-5)
    assert_close(ours.wq.weight.grad, permute_for_interleaved(reference.q_proj.weight.grad, n_heads), atol=1e-5, rtol=1e-5)


def test_lambda_init_schedule():
    """lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1)), l = layer_index + 1: 0.2 in the first layer, -> 0.8 with depth."""
    assert lambda_init_schedule(0) == pytest.approx(0.2, abs=1e-12)
    assert lambda_init_schedule(1) == pytest.approx(0.8 - 0.6 * math.exp(-0.3), abs=1e-12)
    assert lambda_init_schedule(4) == pytest.approx(0.8 - 0.6 * math.exp(-1.2), abs=1e-12)
    assert lambda_init_schedule(60) == pytest.approx(0.8, abs=1e-7)
    values = [lambda_init_schedule(index) for index in range(12)]
    assert all(a < b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="layer_index"):
        lambda_init_schedule(-1)


def test_lambda_equals_lambda_init_at_zero_vectors_and_config_override():
    """With the lambda vectors at 0, eq. 2 gives exp(0) - exp(0) + lambda_init = lambda_init; the module takes the
    schedule at its depth unless `differential.lambda_init` fixes it."""
    config = LlamaConfig.from_preset("tiny", attention="differential", differential={"lambda_std": 0.0})
    module = DifferentialAttention(config, layer_index=5)
    assert module.lambda_init == pytest.approx(lambda_init_schedule(5))
    assert module.differential_lambda().item() == pytest.approx(module.lambda_init, abs=1e-7)
    fixed = LlamaConfig.from_preset("tiny", attention="differential", differential={"lambda_init": 0.5, "lambda_std": 0.0})
    assert DifferentialAttention(fixed, layer_index=5).differential_lambda().item() == pytest.approx(0.5, abs=1e-7)


def test_reset_parameters_draws_the_lambda_vectors_from_normal_lambda_std():
    """Each lambda vector ~ N(0, lambda_std^2), independently, and `Llama.reset_parameters` keeps that (it runs the
    module's own reset_parameters after the generic initialisation)."""
    config = LlamaConfig.from_preset("tiny", dim=64, n_heads=2, n_kv_heads=2, attention="differential", differential={"lambda_std": 0.25})
    torch.manual_seed(0)
    model = Llama(config)
    vectors = [getattr(layer.attention, name) for layer in model.layers for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")]
    values = torch.stack([v.detach() for v in vectors])  # (8, 32): 256 draws
    assert values.mean().abs() < 0.05
    assert values.std().item() == pytest.approx(0.25, rel=0.15)
    assert len({tuple(v.tolist()) for v in values}) == len(vectors)  # independent draws, not one shared vector


def test_odd_head_counts_are_refused():
    config = LlamaConfig.from_preset("tiny", n_heads=4, n_kv_heads=1)  # valid for softmax attention
    with pytest.raises(ValueError, match="must both be even"):
        DifferentialAttention(config, layer_index=0)


@pytest.mark.parametrize("position", ["rope", "alibi", "nope"])
def test_cached_decoding_matches_the_full_forward(position):
    """Llama with differential attention: prefill + one-token steps through the KV cache give the logits of one
    causal forward over the whole sequence, for a left-padded batch (mask, per-row positions) too."""
    config = LlamaConfig.from_preset("tiny", vocab_size=61, max_seq_len=MAX_LEN, attention="differential", position=position)
    torch.manual_seed(0)
    model = Llama(config).eval()
    tokens = torch.randint(1, 61, (2, 10), generator=torch.Generator().manual_seed(3))
    real = torch.ones_like(tokens)
    real[0, :3] = 0  # row 0 left-padded by 3
    with torch.no_grad():
        full = model(tokens, attention_mask=real)
        cache = model.new_cache(batch_size=2, max_len=16)
        steps = [model(tokens[:, :6], cache=cache, attention_mask=real[:, :6])]
        for t in range(6, 10):
            steps.append(model(tokens[:, t : t + 1], cache=cache, attention_mask=real[:, t : t + 1]))
    cached = torch.cat(steps, dim=1)
    keep = real.bool()
    assert_close(cached[keep], full[keep], atol=1e-5, rtol=1e-5)
