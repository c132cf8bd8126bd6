"""Mixture-of-Depths (x_llama.variants.mixture_of_depths, Raposo et al. 2024).

Eq. 1 at capacity 1 against the dense block; top-k routing against the block run on the gathered subsequence alone
(attention inputs built independently: RoPE rows from the table, ALiBi from the positions); `select_tokens` against
a per-row loop; causal routing at inference against the same subsequence rule; cached decoding against the uncached
forward; the section 3.5 auxiliary losses against the BCE written out; where the gradients go.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.testing import assert_close

from x_llama import Llama, LlamaConfig
from x_llama.generation import generate
from x_llama.model import AttentionInputs
from x_llama.variants.alibi import alibi_bias, alibi_slopes
from x_llama.variants.mixture_of_depths import MoDBlock, select_tokens, tokens_per_sequence

DIM, HEADS = 64, 4


def mod_config(capacity: float = 0.5, sampling: str = "predictor", position: str = "rope", **mod) -> LlamaConfig:
    return LlamaConfig.from_preset(
        "tiny",
        vocab_size=97,
        max_seq_len=64,
        position=position,
        router="mod",
        mod={"capacity": capacity, "every": 1, "sampling": sampling, **mod},
    )


def scramble(model: nn.Module, seed: int) -> None:
    """Unit-scale weights (N(0, 1/fan_in), embeddings N(0, 1)) and random RMSNorm gains. The default initialisation
    makes a block's contribution ~1e-3 of the stream, too small for a wrong formula to show above float tolerance."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("tok_embeddings.weight"):
                parameter.copy_(noise)
            elif parameter.ndim == 2:
                parameter.copy_(noise / math.sqrt(parameter.shape[1]))
            else:
                parameter.copy_(1 + 0.2 * noise)


def make_mod(capacity: float = 0.5, sampling: str = "predictor", position: str = "rope", seed: int = 0, **mod) -> tuple[Llama, MoDBlock]:
    torch.manual_seed(seed)
    model = Llama(mod_config(capacity, sampling, position, **mod))
    scramble(model, seed)
    return model, model.layers[0]


def full_inputs(model: Llama, length: int, key_mask: Tensor | None = None) -> AttentionInputs:
    """What Llama.hidden_states hands every layer for an uncached forward at positions 0..T-1."""
    if model.config.position == "alibi":
        positions = torch.arange(length)[None]
        return AttentionInputs(None, None, key_mask, True, alibi_bias(alibi_slopes(HEADS), positions, positions))
    return AttentionInputs(model.rope_cos[:length], model.rope_sin[:length], key_mask, True, None)


def subsequence_inputs(model: Llama, index: Tensor, key_mask: Tensor | None) -> AttentionInputs:
    """The attention inputs of the tokens `index` (k,) of one row run alone, built from their positions directly."""
    mask = None if key_mask is None else key_mask[index][None, None, None, :]  # (1, 1, 1, k)
    if model.config.position == "alibi":
        return AttentionInputs(None, None, mask, True, alibi_bias(alibi_slopes(HEADS), index[None], index[None]))
    return AttentionInputs(model.rope_cos[index], model.rope_sin[index], mask, True, None)


def router_weights(mod: MoDBlock, x: Tensor) -> Tensor:
    """r_i = w^T x_i, (B, T)."""
    return torch.einsum("btd,d->bt", x, mod.router.weight[0])


def predictor_logits(mod: MoDBlock, x: Tensor) -> Tensor:
    """The predictor MLP written out: W2 silu(W1 x), (B, T)."""
    hidden = F.silu(x @ mod.predictor[0].weight.T)
    return (hidden @ mod.predictor[2].weight.T)[..., 0]


def top_k_positions(weights: Tensor, count: int) -> list[Tensor]:
    """Per row, the positions of the `count` largest router weights, in increasing position order."""
    return [torch.argsort(row, descending=True)[:count].sort().values for row in weights]


def left_padding(batch: int, length: int, pads: int) -> Tensor:
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, :pads] = False
    return mask


def test_capacity_rounds_up_exactly():
    assert tokens_per_sequence(0.07, 100) == 7  # 0.07 * 100 = 7.000000000000001 in floats
    assert tokens_per_sequence(0.125, 8) == 1 and tokens_per_sequence(0.125, 9) == 2
    assert tokens_per_sequence(0.01, 10) == 1 and tokens_per_sequence(1.0, 7) == 7


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_full_capacity_equals_dense_block_scaled_by_router(position):
    """Capacity 1: every token is selected, so eq. 1 is x + r (block(x) - x) over the whole sequence, computed densely
    here with r = w^T x by hand (a linear router without bias cannot be forced to 1)."""
    model, mod = make_mod(capacity=1.0, position=position)
    mod.train()
    x = torch.randn(2, 12, DIM, generator=torch.Generator().manual_seed(1))
    inputs = full_inputs(model, 12)
    out = mod(x, inputs, None)
    r = router_weights(mod, x)
    assert (r > 0).any() and (r < 0).any()
    assert_close(out, x + r[..., None] * (mod.block(x, inputs, None) - x))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_training_routes_top_k_through_the_block_on_their_subsequence(position, padded):
    """Only the top-k tokens change, and each equals x_i + r_i (block(X~)_i - x_i) with the block run on the selected
    tokens alone, at their own positions, in causal order, with their padding mask (eq. 1)."""
    model, mod = make_mod(capacity=0.4, position=position)
    mod.train()
    batch, length = 2, 10
    x = torch.randn(batch, length, DIM, generator=torch.Generator().manual_seed(2))
    key_mask = left_padding(batch, length, 3) if padded else None
    out = mod(x, full_inputs(model, length, None if key_mask is None else key_mask[:, None, None, :]), None)
    r = router_weights(mod, x)
    count = tokens_per_sequence(0.4, length)
    for row, chosen in enumerate(top_k_positions(r, count)):
        others = torch.tensor([i for i in range(length) if i not in chosen.tolist()])
        assert torch.equal(out[row, others], x[row, others])
        selected = x[row, chosen]  # (k, dim)
        alone = mod.block(selected[None], subsequence_inputs(model, chosen, None if key_mask is None else key_mask[row]), None)[0]
        assert_close(out[row, chosen], selected + r[row, chosen, None] * (alone - selected))


class CumulativeBlock(nn.Module):
    """A causal stand-in for a hyper-connection Block on (B, T, n, dim): token i's output depends on tokens <= i."""

    def forward(self, x: Tensor, inputs: AttentionInputs, cache) -> Tensor:
        return 2 * x + x.cumsum(dim=1)


def test_streams_route_by_their_sum_and_move_together():
    """With hyper-connections x is (B, T, n, dim): the router reads the sum of the n streams and a selected token is
    gathered (and updated) with all its streams."""
    config = mod_config(capacity=0.5)
    torch.manual_seed(0)
    mod = MoDBlock(CumulativeBlock(), config, layer_index=0).train()
    x = torch.randn(2, 8, 3, DIM, generator=torch.Generator().manual_seed(3))  # n = 3 streams
    out = mod(x, AttentionInputs(None, None, None, True, None), None)
    r = router_weights(mod, x.sum(dim=2))
    for row, chosen in enumerate(top_k_positions(r, 4)):
        others = torch.tensor([i for i in range(8) if i not in chosen.tolist()])
        assert torch.equal(out[row, others], x[row, others])
        selected = x[row, chosen]  # (k, n, dim)
        alone = 2 * selected + selected.cumsum(dim=0)
        assert_close(out[row, chosen], selected + r[row, chosen, None, None] * (alone - selected))

    mod.eval()  # causal routing: the predictor reads the streams' sum too
    out = mod(x, AttentionInputs(None, None, None, True, None), None)
    routed = predictor_logits(mod, x.sum(dim=2)) > 0
    assert routed.any() and (~routed).any()
    dense = x + r[..., None, None] * (2 * x + x.cumsum(dim=1) - x)  # the stand-in ignores the mask: block on all tokens
    assert_close(out, torch.where(routed[..., None, None], dense, x))


def test_select_tokens_gathers_every_attention_input_form():
    """RoPE rows (shared (T, d) or per-row (B, 1, T, d)), masks and biases of any broadcast shape: against a loop."""
    generator = torch.Generator().manual_seed(4)
    batch, length, d = 2, 9, 16
    index = torch.tensor([[0, 3, 4, 8], [1, 2, 6, 7]])
    shared, per_row = torch.randn(length, d, generator=generator), torch.randn(batch, 1, length, d, generator=generator)
    key_mask = torch.rand(batch, 1, 1, length, generator=generator) > 0.3
    full_mask = torch.rand(batch, HEADS, length, length, generator=generator) > 0.5
    square_mask = torch.rand(length, length, generator=generator) > 0.5  # (T, S): shared by rows and heads
    head_bias = torch.randn(1, HEADS, length, length, generator=generator)
    row_bias = torch.randn(batch, 1, length, length, generator=generator)

    cases = [(shared, key_mask, head_bias), (per_row, full_mask, row_bias), (shared, square_mask, None)]
    for table, mask, bias in cases:
        out = select_tokens(AttentionInputs(table, -table, mask, True, bias), index, length)
        assert out.is_causal
        for row, rows in enumerate(index):
            expected_table = table[rows] if table.ndim == 2 else table[row, 0, rows]
            assert_close(out.cos[row, 0], expected_table)
            assert_close(out.sin[row, 0], -expected_table)
            mask4 = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
            mask_row = mask4[row if mask4.shape[0] > 1 else 0]  # (H', T or 1, S)
            expected_mask = mask_row[:, rows if mask_row.shape[1] > 1 else slice(None)][:, :, rows]
            assert torch.equal(out.mask[row], expected_mask)
            if bias is not None:
                bias_row = bias[row if bias.shape[0] > 1 else 0]
                assert torch.equal(out.bias[row], bias_row[:, rows][:, :, rows])
            else:
                assert out.bias is None

    with pytest.raises(ValueError, match="uncached"):  # a cached (T < S) mask has no token-to-slot match
        select_tokens(AttentionInputs(None, None, torch.ones(batch, 1, 1, length + 3, dtype=torch.bool), True), index, length)


@pytest.mark.parametrize("sampling", ["predictor", "loss"])
def test_eval_routes_each_token_alone_and_hides_routed_out_keys(sampling):
    """Section 3.5: token i is routed iff its logit > 0 (sigmoid(r_i) > 0.5 for "loss", the predictor's logit > 0);
    routed-out tokens keep x and are no keys, so routed tokens get the block on the routed subsequence alone."""
    model, mod = make_mod(capacity=0.25, sampling=sampling)
    mod.eval()
    batch, length = 2, 11
    x = torch.randn(batch, length, DIM, generator=torch.Generator().manual_seed(5))
    key_mask = left_padding(batch, length, 4)
    with torch.no_grad():
        out = mod(x, full_inputs(model, length, key_mask[:, None, None, :]), None)
        r = router_weights(mod, x)
        routed = (r if sampling == "loss" else predictor_logits(mod, x)) > 0
        assert routed.any() and (~routed).any() and mod.aux_loss is None
        for row in range(batch):
            chosen, others = routed[row].nonzero()[:, 0], (~routed[row]).nonzero()[:, 0]
            assert torch.equal(out[row, others], x[row, others])
            selected = x[row, chosen]
            alone = mod.block(selected[None], subsequence_inputs(model, chosen, key_mask[row]), None)[0]
            expected = selected + r[row, chosen, None] * (alone - selected)
            real = key_mask[row, chosen]  # a pad query that sees no key attends everywhere: its output is meaningless
            assert_close(out[row, chosen][real], expected[real])


@pytest.mark.parametrize("residual", ["standard", "hyper"])
@pytest.mark.parametrize("sampling", ["predictor", "loss"])
def test_cached_decoding_equals_uncached_forward(sampling, residual):
    """The issue's check: prefill + one token at a time equals the uncached eval forward, also for a left-padded row;
    every routed layer keeps its routed-out keys hidden in later decode steps (cache.extra). With hyper-connections
    the routed layers see (B, T, n, dim) streams."""
    torch.manual_seed(6)
    model = Llama(mod_config(capacity=0.25, sampling=sampling).replace(residual=residual))
    scramble(model, 6)
    model.eval()
    tokens = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(6))
    attention_mask = left_padding(2, 14, 3)
    with torch.no_grad():
        full = model(tokens, attention_mask=attention_mask)
        cache = model.new_cache(2, 14)
        pieces = [model(tokens[:, :6], cache=cache, attention_mask=attention_mask[:, :6])]
        pieces += [model(tokens[:, t : t + 1], cache=cache) for t in range(6, 14)]
    cached = torch.cat(pieces, 1)
    for layer in range(2):
        keys = cache.extra[f"mod{layer}"][:, :14]
        assert keys[1].any() and (~keys[1]).any(), "both routed-in and routed-out tokens are needed for the check to bite"
    assert_close(cached[0, 3:], full[0, 3:], atol=1e-4, rtol=1e-5)
    assert_close(cached[1], full[1], atol=1e-4, rtol=1e-5)
    prompts = [[1, 7, 3, 9, 12], [1, 4]]
    assert generate(model, prompts, 8, use_cache=True) == generate(model, prompts, 8, use_cache=False)


@pytest.mark.parametrize("sampling", ["predictor", "loss"])
def test_aux_loss_is_bce_against_top_k_membership(sampling):
    """L = weight * mean_i -(y_i log sigmoid(l_i) + (1 - y_i) log(1 - sigmoid(l_i))), y_i = 1[i in top-k], with
    l_i = r_i ("loss") or the predictor's logit ("predictor"); the accuracy metric compares l_i > 0 with y_i."""
    model, mod = make_mod(capacity=0.25, sampling=sampling, aux_loss_weight=0.3)
    mod.train()
    x = torch.randn(2, 12, DIM, generator=torch.Generator().manual_seed(7))
    mod(x, full_inputs(model, 12), None)
    r = router_weights(mod, x)
    targets = torch.zeros(2, 12)
    for row, chosen in enumerate(top_k_positions(r, 3)):
        targets[row, chosen] = 1.0
    logits = r if sampling == "loss" else predictor_logits(mod, x)
    p = torch.sigmoid(logits)
    expected = -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p)).mean()
    assert_close(mod.aux_loss, 0.3 * expected)
    assert mod.aux_metrics["mod_causal_accuracy"] == pytest.approx(float(((p > 0.5) == targets.bool()).float().mean()))


def test_router_learns_from_the_output_and_the_predictor_stops_gradient():
    """The r_i factor of eq. 1 is the router's only path to the language-model loss; the predictor's BCE reads
    stop_gradient(x) (section 3.5), so it trains the predictor alone."""
    model, mod = make_mod(capacity=0.5, sampling="predictor")
    mod.train()
    x = torch.randn(2, 10, DIM, generator=torch.Generator().manual_seed(8), requires_grad=True)
    out = mod(x, full_inputs(model, 10), None)
    (router_grad,) = torch.autograd.grad(out.square().sum(), [mod.router.weight], allow_unused=True)
    assert router_grad is not None and router_grad.abs().sum() > 0
    x_grad, router_grad = torch.autograd.grad(mod.aux_loss, [x, mod.router.weight], allow_unused=True)
    assert x_grad is None and router_grad is None
    predictor_grads = torch.autograd.grad(mod.aux_loss, list(mod.predictor.parameters()))
    assert all(grad.abs().sum() > 0 for grad in predictor_grads)

    model, mod = make_mod(capacity=0.5, sampling="loss")  # the router's own BCE shapes the router (and the stream)
    mod.train()
    mod(x, full_inputs(model, 10), None)
    x_grad, router_grad = torch.autograd.grad(mod.aux_loss, [x, mod.router.weight])
    assert x_grad.abs().sum() > 0 and router_grad.abs().sum() > 0


def test_model_trains_with_the_auxiliary_loss_and_drops_it_in_eval():
    model, _ = make_mod(capacity=0.5, every=2)  # every 2nd block routed: layer 1 of 2
    assert [type(layer).__name__ for layer in model.layers] == ["Block", "MoDBlock"]
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(9))
    model.train()
    auxiliary = model.auxiliary_loss
    logits = model(tokens)
    assert auxiliary() is not None and "mod_causal_accuracy" in model.auxiliary_metrics()
    (F.cross_entropy(logits.flatten(0, 1), tokens.flatten()) + auxiliary()).backward()
    assert model.layers[1].router.weight.grad.abs().sum() > 0
    model.eval()
    model(tokens)
    assert auxiliary() is None


def test_bad_input_is_named():
    model, mod = make_mod()
    with pytest.raises(ValueError, match="MoDBlock expects x"):
        mod(torch.randn(2, 5, DIM + 1), full_inputs(model, 5), None)
    mod.eval()
    cache = model.new_cache(1, 8)
    cache.length = 3  # filled without this layer's key mask
    with pytest.raises(ValueError, match="no Mixture-of-Depths key mask"):
        mod(torch.randn(1, 1, DIM), AttentionInputs(model.rope_cos[3:4], model.rope_sin[3:4], None, False), cache)
