"""The model: masks, parity with torch.nn.Transformer, incremental decoding, weight tying, presets."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from axon_shared.checkpoint import load_checkpoint, save_checkpoint
from axon_shared.config import ConfigError
from axon_shared.training import count_parameters
from transformer import FeedForward, Transformer, TransformerConfig

PAD = 3


def small_config(**overrides) -> TransformerConfig:
    values = dict(vocab_size=50, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=48, dropout=0.0, max_len=40)
    return TransformerConfig(**{**values, **overrides})


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values everywhere (LayerNorm gains and all biases too), so a swapped weight shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.1))
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(1.0)
    return model.eval()


def batch(seed=0, b=3, s=7, t=6, vocab=50):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (b, s), generator=gen)
    tgt = torch.randint(4, vocab, (b, t), generator=gen)
    src[1, 4:] = PAD  # a padded source row
    src[2, 6:] = PAD
    return src, tgt


def test_no_future_leakage():
    model = randomize(Transformer(small_config()))
    src, tgt = batch()
    base = model(src, tgt)
    for j in range(tgt.shape[1]):
        changed = tgt.clone()
        changed[:, j] = (changed[:, j] + 7) % 46 + 4
        out = model(src, changed)
        assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
        assert (out[:, j:] - base[:, j:]).abs().max() > 1e-3  # the change is visible from position j on


def test_padding_invariance():
    model = randomize(Transformer(small_config()))
    src, tgt = batch()
    base = model(src, tgt)
    padded_src = torch.cat([src, torch.full((3, 5), PAD)], dim=1)
    padded_tgt = torch.cat([tgt, torch.full((3, 4), PAD)], dim=1)
    assert_close(model(padded_src, tgt), base, rtol=1e-5, atol=1e-5)
    assert_close(model(src, padded_tgt)[:, : tgt.shape[1]], base, rtol=1e-5, atol=1e-5)
    # and the source padding mask matters: attending to pad embeddings would change the output
    src_pad_visible = padded_src.clone()
    src_pad_visible[src_pad_visible == PAD] = 5
    assert (model(src_pad_visible, tgt) - base).abs().max() > 1e-3


def to_torch_transformer(model: Transformer) -> nn.Transformer:
    """An nn.Transformer with the same configuration holding our weights (q, k, v packed into in_proj)."""
    cfg = model.config
    ref = nn.Transformer(
        cfg.d_model,
        cfg.n_heads,
        cfg.n_encoder_layers,
        cfg.n_decoder_layers,
        cfg.d_ff,
        dropout=0.0,
        activation=cfg.activation,
        layer_norm_eps=cfg.layer_norm_eps,
        batch_first=True,
        norm_first=cfg.norm_first,
    )

    def copy_attention(theirs: nn.MultiheadAttention, ours) -> None:
        theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        theirs.out_proj.load_state_dict(ours.out_proj.state_dict())

    with torch.no_grad():
        for theirs, ours in zip(ref.encoder.layers, model.encoder_layers):
            copy_attention(theirs.self_attn, ours.self_attn)
            theirs.linear1.load_state_dict(ours.ffn.linear1.state_dict())
            theirs.linear2.load_state_dict(ours.ffn.linear2.state_dict())
            theirs.norm1.load_state_dict(ours.sub_attn.norm.state_dict())
            theirs.norm2.load_state_dict(ours.sub_ffn.norm.state_dict())
        for theirs, ours in zip(ref.decoder.layers, model.decoder_layers):
            copy_attention(theirs.self_attn, ours.self_attn)
            copy_attention(theirs.multihead_attn, ours.cross_attn)
            theirs.linear1.load_state_dict(ours.ffn.linear1.state_dict())
            theirs.linear2.load_state_dict(ours.ffn.linear2.state_dict())
            theirs.norm1.load_state_dict(ours.sub_self.norm.state_dict())
            theirs.norm2.load_state_dict(ours.sub_cross.norm.state_dict())
            theirs.norm3.load_state_dict(ours.sub_ffn.norm.state_dict())
        if cfg.norm_first:  # pre-norm: both stacks end in a LayerNorm, as nn.Transformer builds by default
            ref.encoder.norm.load_state_dict(model.encoder_norm.state_dict())
            ref.decoder.norm.load_state_dict(model.decoder_norm.state_dict())
        else:  # post-norm (the paper): every sublayer already ends in LayerNorm; no extra final norm
            ref.encoder.norm = None
            ref.decoder.norm = None
    return ref.eval()


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_parity_with_torch_nn_transformer(norm_first):
    torch.manual_seed(0)
    model = randomize(Transformer(small_config(norm_first=norm_first)))
    ref = to_torch_transformer(model)
    src, tgt = batch(b=4, s=9, t=8)
    with torch.no_grad():
        ours = model(src, tgt)
        src_pad = src == PAD  # nn.Transformer masks are True = "may NOT attend"
        hidden = ref(
            model.embed(src),
            model.embed(tgt),
            tgt_mask=nn.Transformer.generate_square_subsequent_mask(tgt.shape[1]),
            src_key_padding_mask=src_pad,
            memory_key_padding_mask=src_pad,
            tgt_is_causal=True,
        )
        theirs = hidden @ model.embedding.weight.t()
        memory, _ = model.encode(src)
        ref_memory = ref.encoder(model.embed(src), src_key_padding_mask=src_pad)
    assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    real = ~src_pad
    assert_close(memory[real], ref_memory[real], rtol=1e-5, atol=1e-5)


def test_embedding_scale_and_positions():
    cfg = small_config()
    model = randomize(Transformer(cfg))
    tokens = torch.tensor([[5, 9, 11]])
    from axon_shared.layers import sinusoidal_embedding

    expected = model.embedding.weight[tokens[0]] * cfg.d_model**0.5 + sinusoidal_embedding(torch.arange(3), cfg.d_model)
    assert_close(model.embed(tokens)[0], expected)
    # PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...)
    pos, i = 2, 3
    assert_close(model.positions[pos, 2 * i], torch.tensor(2 / 10000 ** (2 * i / cfg.d_model)).sin())
    assert_close(model.positions[pos, 2 * i + 1], torch.tensor(2 / 10000 ** (2 * i / cfg.d_model)).cos())


@pytest.mark.parametrize("norm_first", [False, True])
def test_incremental_decoding_equals_full_forward(norm_first):
    model = randomize(Transformer(small_config(norm_first=norm_first)))
    src, tgt = batch()
    with torch.no_grad():
        full = model(src, tgt)
        memory, src_mask = model.encode(src)
        cache = model.start_cache(memory, src_mask)
        steps = [model.decode_step(tgt[:, :2], cache)]  # a two-token chunk, then one token at a time
        steps += [model.decode_step(tgt[:, j : j + 1], cache) for j in range(2, tgt.shape[1])]
    assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == tgt.shape[1]
    assert cache.self_kv[0][0].shape == (3, 4, tgt.shape[1], 8)


def test_cache_select_reorders_rows():
    model = randomize(Transformer(small_config()))
    src, tgt = batch()
    with torch.no_grad():
        memory, src_mask = model.encode(src)
        cache = model.start_cache(memory, src_mask)
        model.decode_step(tgt[:, :3], cache)
        order = torch.tensor([2, 0])
        cache = cache.select(order)
        step = model.decode_step(tgt[order, 3:4], cache)
    assert_close(step, model(src[order], tgt[order, :4])[:, 3:4], rtol=1e-5, atol=1e-5)


def test_weights_tied_after_load_and_ddp(tmp_path):
    model = Transformer(small_config())
    assert model.output_weight is model.embedding.weight
    assert sum(p.numel() for p in model.parameters()) == count_parameters(model)
    path = save_checkpoint(tmp_path / "c.safetensors", model=model)
    fresh = Transformer(small_config())
    load_checkpoint(path).restore(fresh)
    assert fresh.output_weight is fresh.embedding.weight
    assert_close(fresh.embedding.weight, model.embedding.weight)
    # one optimizer step moves the shared matrix once, for both uses
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    src, tgt = batch()
    fresh(src, tgt).logsumexp(-1).mean().backward()
    opt.step()
    assert fresh.output_weight is fresh.embedding.weight

    import torch.distributed as dist

    from axon_shared.distributed import DistContext, wrap_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        wrapped = wrap_model(fresh, DistContext(rank=0, world_size=2))  # is_distributed -> DDP
        assert isinstance(wrapped, nn.parallel.DistributedDataParallel)
        inner = wrapped.module
        assert inner.output_weight is inner.embedding.weight
        names = [n for n, _ in wrapped.named_parameters()]
        assert sum("embedding" in n for n in names) == 1  # DDP syncs one shared matrix
        wrapped(src, tgt).sum().backward()
        assert inner.embedding.weight.grad is not None
    finally:
        dist.destroy_process_group()


class Untied(Transformer):
    """The same network with a separate pre-softmax matrix: the reference the tied model is checked against."""

    def __init__(self, config: TransformerConfig, output: torch.Tensor):
        super().__init__(config)
        self.output = nn.Parameter(output.clone())

    @property
    def output_weight(self) -> torch.Tensor:
        return self.output


def test_tied_matrix_gets_the_gradient_of_both_uses():
    """Section 3.4 shares one matrix between the embeddings and the pre-softmax projection, so its gradient is
    the sum of the gradients of the two uses. An untied copy of the model (same values, a separate output matrix)
    computes the two parts apart: the tied gradient must equal their sum, and each part must be non-zero (so a
    projection through a detached copy, or an embedding lookup outside the graph, would fail here)."""
    config = small_config()
    tied = randomize(Transformer(config))
    untied = Untied(config, tied.embedding.weight.detach())
    untied.load_state_dict(tied.state_dict() | {"output": tied.embedding.weight.detach()})
    src, tgt = batch()
    for model in (tied, untied):
        model(src, tgt).log_softmax(-1)[..., 5].mean().backward()
    as_input, as_output = untied.embedding.weight.grad, untied.output.grad
    assert as_input.abs().max() > 1e-4 and as_output.abs().max() > 1e-4
    assert_close(tied.embedding.weight.grad, as_input + as_output, rtol=1e-5, atol=1e-7)
    # the optimizer holds the shared matrix once: one parameter tensor of shape (V, d), counted once
    shapes = [tuple(p.shape) for p in tied.parameters()]
    assert shapes.count((config.vocab_size, config.d_model)) == 1
    assert count_parameters(untied) - count_parameters(tied) == config.vocab_size * config.d_model


def test_checkpoint_with_a_separate_output_matrix_is_refused(tmp_path):
    """A checkpoint whose output projection is a tensor of its own (an untied model, or weights converted from a
    library that stores both) cannot load into the tied model silently: strict loading names the extra tensor."""
    config = small_config()
    untied = Untied(config, torch.randn(config.vocab_size, config.d_model))
    path = save_checkpoint(tmp_path / "untied.safetensors", model=untied)
    with pytest.raises(Exception, match="output"):
        load_checkpoint(path).restore(Transformer(config))


@pytest.mark.parametrize(
    "preset, expected",
    [
        # embeddings 37000*512 + 6 encoder layers * 3,152,384 + 6 decoder layers * 4,204,032
        ("base", 63_082_496),
        # 37000*1024 + 6 * 12,596,224 + 6 * 16,796,672
        ("big", 214_245_376),
        ("cpu", 7_577_600),
    ],
)
def test_parameter_counts(preset, expected):
    cfg = TransformerConfig.from_preset(preset)
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    attention, ffn, norm = 4 * (d * d + d), 2 * d * f + f + d, 2 * d
    formula = v * d + cfg.n_encoder_layers * (attention + ffn + 2 * norm) + cfg.n_decoder_layers * (2 * attention + ffn + 3 * norm)
    assert formula == expected
    with torch.device("meta"):
        model = Transformer(cfg)
    assert count_parameters(model) == expected


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(d_model=30, n_heads=4), "d_model"),
        (dict(dropout=1.5), "dropout"),
        (dict(pad_id=2), "pad_id"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(activation="tanh"), "activation"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"TransformerConfig\.{field}="):
        small_config(**overrides)


def test_too_long_input_is_a_clear_error():
    model = Transformer(small_config(max_len=10))
    with pytest.raises(ValueError, match="exceeds max_len=10"):
        model(torch.randint(4, 50, (1, 11)), torch.randint(4, 50, (1, 3)))


def test_feedforward_matches_explicit_formula():
    torch.manual_seed(0)
    ff = FeedForward(8, 32, activation="relu")
    x = torch.randn(2, 3, 8)
    expected = F.linear(F.relu(F.linear(x, ff.linear1.weight, ff.linear1.bias)), ff.linear2.weight, ff.linear2.bias)
    assert_close(ff(x), expected)
    with pytest.raises(ValueError, match="activation"):
        FeedForward(8, 32, activation="tanh")
