"""Hyper-connections (x_llama.variants.hyper_connections; Zhu et al. 2024, arXiv:2409.19606).

1. The paper's initialisation (eq. 13) makes a block the pre-norm block it replaces: with n = 1 exactly x + f(x);
   with n > 1 every stream equals the pre-norm state and their sum is n times it; from unequal streams, layer k
   reads stream k mod n, keeps every stream and adds its output to every stream.
2. Against lucidrains' `hyper-connections` 0.4.11 (`HyperConnections`, written from the paper's Algorithm 2), whose
   parameterisation is the paper's: the same initialisation for every k, and, with random weights mapped onto it,
   the same outputs and the same gradients (DHC; SHC is the reference with its dynamic weights zero).

   Which of its options are the paper's: `HyperConnections(n, dim=dim, layer_index=k)` with the defaults
   tanh=True (eqs. 10-12 squash with tanh), num_fracs=1 (frac-connections, a later paper), num_input_views=1,
   add_branch_out_to_residual=True (B), depth_residual_fn=add (eq. 5's sum), dropout=0, channel_first=False; and
   `get_expand_reduce_stream_functions(n)` (copy / sum, add_stream_embed=False). Differences found: its streams
   sit in the batch axis, (b s) t d, against our (b, t, s, d); its norm is an RMSNorm without eps whose gain is
   parameterised as 1 + gamma (gamma = 0 at init; the paper's code uses LayerNorm, ours is x_llama's RMSNorm with
   eps and gain g = 1 at init: gamma = g - 1, and eps is set to 0 here to compare tightly); the scales s_alpha,
   s_beta are single scalars initialised to 0.01, as in the paper's code and ours; it has no static-only (SHC)
   mode, its dynamic weights always exist; without layer_index it draws the stream A_m reads at random instead
   of k mod n; `get_init_and_expand_reduce_stream_functions` swaps n = 1 for a plain residual with no weights
   (ours keeps the learnable n = 1 connection); A_m and A_r are stored together as one (n, 1 + n) matrix, and
   W_m, W_r as one (dim, 1 + n) matrix.
3. Gradients reach the static and the dynamic weights (and, exactly as eq. 13 implies, not yet the scales and the
   norm gain at initialisation, where tanh(H̄ 0) = 0 multiplies them).
"""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from hyper_connections import HyperConnections
from torch import Tensor, nn
from torch.testing import assert_close

from x_llama.config import LlamaConfig
from x_llama.model import AttentionInputs, Block, Llama
from x_llama.variants.hyper_connections import HyperConnection, collapse_streams, expand_streams

DIM = 64  # the tiny preset's
BATCH, LENGTH = 2, 5


def hyper_config(rate: int, dynamic: bool) -> LlamaConfig:
    return LlamaConfig.from_preset("tiny", residual="hyper", hyper={"rate": rate, "dynamic": dynamic})


def nonlinear_sublayer(seed: int) -> nn.Module:
    """A stand-in sublayer T that is neither linear nor scale-invariant, so any wrong mixing shows."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, DIM))


def randomise(module: HyperConnection, seed: int) -> None:
    """Non-initial weights, large enough that tanh is non-linear and the dynamic terms matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            std = 0.2 if name.endswith("projection") else 0.5
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std + (1.0 if name.endswith("weight") else 0.0))


def copy_onto_reference(ours: HyperConnection, reference: HyperConnections) -> None:
    """Our parameters onto lucidrains': static_alpha = [A_m | A_r], dynamic_alpha_fn = [W_m | W_r], gamma = g - 1."""
    with torch.no_grad():
        reference.static_alpha.copy_(torch.cat([ours.input_weights[:, None], ours.residual_weights], dim=1))
        reference.static_beta.copy_(ours.output_weights)
        if ours.dynamic:
            reference.dynamic_alpha_fn.copy_(torch.cat([ours.input_projection[:, None], ours.residual_projection], dim=1))
            reference.dynamic_alpha_scale.copy_(ours.width_scale)
            reference.dynamic_beta_fn.copy_(ours.output_projection)
            reference.dynamic_beta_scale.copy_(ours.depth_scale)
            reference.norm.gamma.copy_(ours.norm.weight - 1.0)
        else:  # SHC = the reference with no dynamic part
            reference.dynamic_alpha_fn.zero_()
            reference.dynamic_beta_fn.zero_()


def reference_forward(reference: HyperConnections, streams: Tensor, sublayer: nn.Module) -> Tensor:
    """lucidrains' hyper-connection on our layout: streams (B, T, n, d) <-> its (B n, T, d)."""
    rate = streams.shape[2]
    sublayer_input, add_residual = reference(rearrange(streams, "b t n d -> (b n) t d"))
    return rearrange(add_residual(sublayer(sublayer_input)), "(b n) t d -> b t n d", n=rate)


# ---- 1. the paper's initialisation is the pre-norm residual ------------------------------------------------------
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("rate", [1, 3])
def test_block_at_initialisation_is_the_prenorm_block(rate: int, dynamic: bool) -> None:
    """A Block (attention then feed-forward: the paper's layers k = 0, 1) with hyper-connections at eq. 13 against the
    standard pre-norm Block with the same weights: from equal streams, every output stream is the pre-norm output
    h + F(h), h = x + Attn(x), and their sum (the model's output) is n times it. Catches B != 1 (streams would
    differ), A_r != I (n = 3: a stream would gain or lose copies) and A_m or B wrong with n = 1."""
    torch.manual_seed(0)
    standard = Block(LlamaConfig.from_preset("tiny"), 0)
    hyper = Block(hyper_config(rate, dynamic), 0)
    missing, unexpected = hyper.load_state_dict(standard.state_dict(), strict=False)
    assert not unexpected and missing and all(key.startswith("hyper_connections.") for key in missing)
    x = torch.randn(BATCH, LENGTH, DIM)
    inputs = AttentionInputs(cos=None, sin=None, mask=None, is_causal=True)

    expected = standard(x, inputs, None)  # (B, T, d)
    streams = hyper(expand_streams(x, rate), inputs, None)  # (B, T, n, d)

    assert streams.shape == (BATCH, LENGTH, rate, DIM)
    assert_close(streams, expected[:, :, None].expand_as(streams))
    assert_close(collapse_streams(streams), rate * expected)
    assert not torch.allclose(expected, x, atol=1e-3)  # the sublayers did contribute


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_layer_k_reads_stream_k_mod_n_and_writes_every_stream(dynamic: bool) -> None:
    """Eq. 13 from unequal streams H: layer k's sublayer input is exactly stream k mod n (A_m = e_{k mod n}) and the
    output is H + T(h_{k mod n}) on every stream (A_r = I, B = 1). Catches A_m = e_0 for every layer, A_m = 1/n,
    A_r transposed to a permutation, B = e_{k mod n}: everything the equal-stream test above cannot see."""
    rate = 3
    config = hyper_config(rate, dynamic)
    sublayer = nonlinear_sublayer(1)
    torch.manual_seed(2)
    streams = torch.randn(BATCH, LENGTH, rate, DIM)
    for layer_index in range(rate):
        for sublayer_index in (0, 1):
            k = 2 * layer_index + sublayer_index
            connection = HyperConnection(config, layer_index, sublayer_index)
            seen: list[Tensor] = []
            out = connection(streams, lambda h, seen=seen: seen.append(h) or sublayer(h))
            assert_close(seen[0], streams[:, :, k % rate], rtol=0, atol=0)
            assert_close(out, streams + sublayer(streams[:, :, k % rate])[:, :, None])


def test_initialisation_matches_lucidrains_and_survives_reinitialisation() -> None:
    """Our eq. 13 parameters equal lucidrains' for every layer counter k = 2 * layer + sublayer (its static_alpha
    = [e_{k mod n} | I], static_beta = 1, zero dynamic weights, scales 0.01, unit norm gain), and reset_parameters
    restores them after the model's generic re-initialisation has overwritten them."""
    rate = 4
    for layer_index in range(3):
        for sublayer_index in (0, 1):
            k = 2 * layer_index + sublayer_index
            ours = HyperConnection(hyper_config(rate, dynamic=True), layer_index, sublayer_index)
            reference = HyperConnections(rate, dim=DIM, layer_index=k)
            expected = {
                "static_alpha": torch.cat([ours.input_weights[:, None], ours.residual_weights], dim=1),
                "static_beta": ours.output_weights,
                "dynamic_alpha_fn": torch.cat([ours.input_projection[:, None], ours.residual_projection], dim=1),
                "dynamic_alpha_scale": ours.width_scale,
                "dynamic_beta_fn": ours.output_projection,
                "dynamic_beta_scale": ours.depth_scale,
                "norm.gamma": ours.norm.weight - 1.0,
            }
            for name, value in reference.named_parameters():
                assert_close(value.detach(), expected[name].detach(), rtol=0, atol=0, msg=f"k={k}: {name}")
            before = {name: p.detach().clone() for name, p in ours.named_parameters()}
            randomise(ours, seed=k)
            ours.reset_parameters()
            for name, p in ours.named_parameters():
                assert_close(p.detach(), before[name], rtol=0, atol=0, msg=f"k={k}: {name} after reset_parameters")


def test_static_connection_has_only_static_weights() -> None:
    """SHC: A_m, A_r, B only, n + n^2 + n numbers; DHC adds W_m, W_r, W_beta, the norm gain and s_alpha, s_beta."""
    rate = 4
    static = HyperConnection(hyper_config(rate, dynamic=False), 0, 0)
    dynamic = HyperConnection(hyper_config(rate, dynamic=True), 0, 0)
    assert sum(p.numel() for p in static.parameters()) == rate + rate * rate + rate
    assert sum(p.numel() for p in dynamic.parameters()) == rate + rate * rate + rate + DIM * (1 + rate + 1) + DIM + 2


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_llama_with_hyper_connections_starts_as_llama(dynamic: bool) -> None:
    """The whole model at eq. 13 (n = 2, two blocks: k = 0..3, after Llama.reset_parameters): with the standard
    model's weights it gives the standard logits, because the streams stay equal, their sum is n x_L and the final
    RMSNorm removes the factor n. That holds exactly only without the norm's eps (with eps = 1e-5 and the 0.02-std
    initialisation the logits differ by ~0.75% of their largest value), so eps is made negligible here."""
    rate = 2
    standard_config = LlamaConfig.from_preset("tiny", vocab_size=97, max_seq_len=32, norm_eps=1e-12)
    hyper_config_ = LlamaConfig.from_preset(
        "tiny", vocab_size=97, max_seq_len=32, norm_eps=1e-12, residual="hyper", hyper={"rate": rate, "dynamic": dynamic}
    )
    torch.manual_seed(10)
    standard = Llama(standard_config).eval()
    hyper = Llama(hyper_config_).eval()
    for layer_index, layer in enumerate(hyper.layers):  # Llama.reset_parameters left eq. 13 in place
        for sublayer_index, connection in enumerate(layer.hyper_connections):
            k = 2 * layer_index + sublayer_index
            assert_close(connection.input_weights.detach(), torch.eye(rate)[k % rate], rtol=0, atol=0)
    missing, unexpected = hyper.load_state_dict(standard.state_dict(), strict=False)
    assert not unexpected and all(".hyper_connections." in key for key in missing)
    tokens = torch.randint(0, 97, (BATCH, 7), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert_close(hyper(tokens), standard(tokens))


def test_llama_with_hyper_connections_decodes_with_the_cache() -> None:
    """Hyper-connections keep no state across tokens: with random (non-initial) stream weights, the logits of a
    prefix then one token through the KV cache equal the full forward's."""
    config = LlamaConfig.from_preset("tiny", vocab_size=97, max_seq_len=32, residual="hyper", hyper={"rate": 3, "dynamic": True})
    torch.manual_seed(12)
    model = Llama(config).eval()
    for index, connection in enumerate(m for m in model.modules() if isinstance(m, HyperConnection)):
        randomise(connection, seed=20 + index)
    tokens = torch.randint(0, 97, (BATCH, 6), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(BATCH)
        prefix = model(tokens[:, :-1], cache=cache)
        last = model(tokens[:, -1:], cache=cache)
    assert_close(torch.cat([prefix, last], dim=1), full, rtol=1e-4, atol=1e-5)


# ---- 2. parity with lucidrains' hyper-connections, random weights ----------------------------------------------
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_matches_lucidrains_outputs_and_gradients(dynamic: bool) -> None:
    """Random (non-initial) weights mapped onto lucidrains' HyperConnections: the same Ĥ (eqs. 2-5, 9-12) and the
    same gradients for every mapped weight and for the streams. Catches A_r^T H written as A_r H, one scale for
    both width and depth connections swapped, tanh dropped, the norm skipped, B(H) indexed by the wrong stream."""
    rate, layer_index, sublayer_index = 4, 1, 0
    ours = HyperConnection(hyper_config(rate, dynamic), layer_index, sublayer_index)
    randomise(ours, seed=3)
    if dynamic:
        ours.norm.eps = 0.0  # its RMSNorm has no eps
    reference = HyperConnections(rate, dim=DIM, layer_index=2 * layer_index + sublayer_index)
    copy_onto_reference(ours, reference)
    sublayer = nonlinear_sublayer(4)
    torch.manual_seed(5)
    streams = torch.randn(BATCH, LENGTH, rate, DIM)
    probe = torch.randn(BATCH, LENGTH, rate, DIM)  # a random linear loss, so every output entry is weighed

    ours_streams = streams.clone().requires_grad_()
    reference_streams = streams.clone().requires_grad_()
    out = ours(ours_streams, sublayer)
    expected = reference_forward(reference, reference_streams, sublayer)
    assert_close(out, expected)
    assert not torch.allclose(out, streams + sublayer(streams[:, :, (2 * layer_index) % rate])[:, :, None], atol=1e-2)

    (out * probe).sum().backward()
    (expected * probe).sum().backward()
    alpha_grad = reference.static_alpha.grad
    assert_close(ours.input_weights.grad, alpha_grad[:, 0])
    assert_close(ours.residual_weights.grad, alpha_grad[:, 1:])
    assert_close(ours.output_weights.grad, reference.static_beta.grad)
    assert_close(ours_streams.grad, reference_streams.grad)
    if dynamic:
        fn_grad = reference.dynamic_alpha_fn.grad
        assert_close(ours.input_projection.grad, fn_grad[:, 0])
        assert_close(ours.residual_projection.grad, fn_grad[:, 1:])
        assert_close(ours.output_projection.grad, reference.dynamic_beta_fn.grad)
        assert_close(ours.width_scale.grad, reference.dynamic_alpha_scale.grad)
        assert_close(ours.depth_scale.grad, reference.dynamic_beta_scale.grad)
        assert_close(ours.norm.weight.grad, reference.norm.gamma.grad)
    for name, parameter in ours.named_parameters():  # random weights: every parameter is used
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name


# ---- 3. gradients at initialisation ----------------------------------------------------------------------------
def test_gradients_reach_static_and_dynamic_weights_at_initialisation() -> None:
    """At eq. 13 every entry of A_m, A_r, B, W_m, W_r and W_beta gets a non-zero gradient (the dynamic weights start
    at 0 but s = 0.01 and tanh'(0) = 1 pass the gradient on), while s_alpha, s_beta and the norm gain get exactly 0
    (they multiply tanh(H̄ W) = 0). Catches the dynamic part detached or not added, or part of a matrix unused."""
    rate = 3
    connection = HyperConnection(hyper_config(rate, dynamic=True), 2, 1)
    sublayer = nonlinear_sublayer(6)
    torch.manual_seed(7)
    streams = torch.randn(BATCH, LENGTH, rate, DIM)
    probe = torch.randn(BATCH, LENGTH, rate, DIM)
    (connection(streams, sublayer) * probe).sum().backward()
    for name in ("input_weights", "residual_weights", "output_weights", "input_projection", "residual_projection", "output_projection"):
        grad = getattr(connection, name).grad
        assert grad is not None and bool((grad != 0).all()), f"{name} has zero gradient entries: {grad}"
    for parameter in (connection.width_scale, connection.depth_scale, connection.norm.weight):
        assert_close(parameter.grad, torch.zeros_like(parameter), rtol=0, atol=0)


# ---- precision and bad input -----------------------------------------------------------------------------------
def test_streams_are_mixed_in_float32_under_bf16_autocast() -> None:
    """Under bf16 autocast only the sublayer runs in bf16: with a zero sublayer the output A_r^T H is bitwise the
    float32 result (an einsum under autocast would round the residual streams to bf16 every layer)."""
    connection = HyperConnection(hyper_config(3, dynamic=True), 0, 0)
    randomise(connection, seed=8)
    torch.manual_seed(9)
    streams = torch.randn(BATCH, LENGTH, 3, DIM)
    expected = connection(streams, torch.zeros_like)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = connection(streams, torch.zeros_like)
    assert out.dtype == torch.float32
    assert_close(out, expected, rtol=0, atol=0)


def test_bad_input_is_refused_with_the_fix() -> None:
    config = hyper_config(4, dynamic=True)
    connection = HyperConnection(config, 0, 0)
    with pytest.raises(ValueError, match="expand_streams"):
        connection(torch.randn(BATCH, LENGTH, DIM), nn.Identity())  # forgot to expand
    with pytest.raises(ValueError, match="n=4"):
        connection(torch.randn(BATCH, LENGTH, 2, DIM), nn.Identity())
    with pytest.raises(ValueError, match="sublayer_index"):
        HyperConnection(config, 0, 2)
    with pytest.raises(ValueError, match="rate"):
        expand_streams(torch.randn(BATCH, LENGTH, DIM), 0)
