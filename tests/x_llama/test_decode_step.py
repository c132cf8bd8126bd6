"""`Llama.decode_step`: one decoding step with fixed shapes (a graph torch.compile captures whole), equal to the cached
forward it replaces; `generate(..., compile=True)` built on it."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from axon_shared.config import ConfigError
from x_llama import Llama, LlamaConfig, generate
from x_llama.config import GenerateConfig
from x_llama.generation import left_pad

PROMPTS = [[1, 5, 8, 13, 21, 34, 55], [1, 2], [1, 40, 41, 42]]  # left-padded into one batch


def steps_both_ways(model: Llama, steps: int, *, compile: bool) -> tuple[list, list, object, object]:
    """Prefill the same left-padded batch into two caches, then decode `steps` greedy tokens with the cached forward
    and with decode_step, each fed the forward's tokens: (forward logits, decode_step logits, both caches)."""
    tokens, mask = left_pad(PROMPTS)
    with torch.no_grad():
        by_forward, by_step = model.new_cache(3, 24), model.new_cache(3, 24)
        logits = model(tokens, cache=by_forward, attention_mask=mask)[:, -1]
        model(tokens, cache=by_step, attention_mask=mask)
        expected, got = [], []
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)  # (B, 1)
            logits = model(token, cache=by_forward)[:, -1]
            expected.append(logits)
            got.append(model.decode_step(token, by_step, compile=compile))
    return expected, got, by_forward, by_step


@pytest.mark.parametrize(
    "overrides",
    [dict(n_heads=4, n_kv_heads=4), dict(n_heads=4, n_kv_heads=2), dict(n_heads=4, n_kv_heads=1), dict(position="nope")],
    ids=["mha", "gqa", "mqa", "nope"],
)
def test_decode_step_equals_the_cached_forward(overrides):
    """Same logits at every step of a left-padded batch (rows at different RoPE positions, pad slots masked), the
    cache written at the same slots, and the same length and next positions afterwards."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=97, max_seq_len=64, **overrides)).eval()
    expected, got, by_forward, by_step = steps_both_ways(model, 6, compile=False)
    for want, have in zip(expected, got):
        assert_close(have, want, atol=1e-5, rtol=1e-5)
    assert_close(by_step.k, by_forward.k, atol=1e-6, rtol=0)  # the same keys and values at the same slots
    assert_close(by_step.v, by_forward.v, atol=1e-6, rtol=0)
    assert by_step.length == by_forward.length == 7 + 6
    assert by_step.k[:, :, :, 13:].abs().sum() == 0 and by_step.k[:, :, :, 12].abs().sum() > 0  # nothing past them
    assert by_step.next_position.tolist() == by_forward.next_position.tolist() == [13, 8, 10]


def test_compiled_decode_equals_eager_and_follows_new_weights(tiny_model, tiny_config):
    """The compiled graph gives the eager numbers; generate(compile=True) the same tokens and log-probs; a second
    model of the same shape reuses the graph (no recompilation) and decodes with its own weights, not the first's."""
    import torch._dynamo.utils

    expected, got, by_forward, by_step = steps_both_ways(tiny_model, 4, compile=True)
    for want, have in zip(expected, got):
        assert_close(have, want, atol=1e-5, rtol=1e-5)
    assert_close(by_step.k, by_forward.k, atol=1e-6, rtol=0)

    eager = generate(tiny_model, PROMPTS, 12, return_logprobs=True)
    compiled = generate(tiny_model, PROMPTS, 12, return_logprobs=True, compile=True)
    assert compiled.tokens == eager.tokens
    assert_close(torch.tensor(compiled.logprobs), torch.tensor(eager.logprobs), atol=1e-5, rtol=0)

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch.manual_seed(1)
    other = Llama(tiny_config).eval()
    expected, got, _, _ = steps_both_ways(other, 2, compile=True)
    for want, have in zip(expected, got):
        assert_close(have, want, atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_compiled_step_decomposes_thin_products_and_restores_the_limits():
    """A compiled step rewrites a linear layer's (rows, K) x (K, N) product as a multiply and a sum (inductor's
    decompose_mm_pass under `decode_mm_limits(rows)`; inductor's default is one row and N <= 2,048): at 1 row every
    product, the 3,000-word output layer included; at 4 rows all but the output layer. The pass's limits are inductor's
    again afterwards, for the process's other graphs. Compiled afresh: a cached graph would skip the passes."""
    from torch._dynamo.utils import counters
    from torch._inductor.fx_passes import decompose_mem_bound_mm as mm_pass

    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=3000, max_seq_len=64)).eval()
    linear_layers = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    defaults = (mm_pass.cpu_max_first_dimension_decomposition, mm_pass.cpu_max_other_dimension_decomposition)
    for rows, decomposed in ((1, linear_layers), (4, linear_layers - 1)):
        counters.clear()
        with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
            logits = model.decode_step(torch.ones(rows, 1, dtype=torch.long), model.new_cache(rows, 40), compile=True)
        with torch.no_grad():
            expected = model(torch.ones(rows, 1, dtype=torch.long), cache=model.new_cache(rows, 40))[:, -1]
        assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        assert counters["inductor"]["decompose_mm"] == decomposed
        assert (mm_pass.cpu_max_first_dimension_decomposition, mm_pass.cpu_max_other_dimension_decomposition) == defaults


def test_decode_step_refuses_what_it_does_not_run(tiny_model):
    alibi = Llama(LlamaConfig.from_preset("tiny", vocab_size=97, max_seq_len=64, position="alibi")).eval()
    with pytest.raises(ValueError, match="position.*alibi.*compile=False"):
        alibi.decode_step(torch.tensor([[1]]), alibi.new_cache(1, 8))
    cache = tiny_model.new_cache(1, 8)
    with pytest.raises(ValueError, match=r"one new token per row, \(batch, 1\); got shape \(1, 2\)"):
        tiny_model.decode_step(torch.tensor([[1, 2]]), cache)
    with pytest.raises(ValueError, match="token ids must lie in"):
        tiny_model.decode_step(torch.tensor([[97]]), cache)
    with pytest.raises(ValueError, match="use_cache=True"):
        generate(tiny_model, [[1, 2]], 3, use_cache=False, compile=True)
    with pytest.raises(ConfigError, match="GenerateConfig.compile=True: decodes with the KV cache"):
        GenerateConfig(compile=True, use_cache=False).validate()


@pytest.mark.parametrize("new, slots", [(10, 64), (54, 64), (55, 128), (240, 256)])
def test_compiled_generate_rounds_the_cache_up_to_64_slots(monkeypatch, new, slots):
    """The compiled graph is specialised to the cache length, so generate(compile=True) allocates the prompt (10
    tokens) + new tokens rounded up to a multiple of 64, at most max_seq_len (256 here); without compile, exactly
    prompt + new."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=97, max_seq_len=256)).eval()
    allocated = []

    def spy(batch_size, max_len=None):
        allocated.append(max_len)
        raise InterruptedError  # stop before decoding: only the allocation is under test

    monkeypatch.setattr(model, "new_cache", spy)
    for compile in (True, False):
        with pytest.raises(InterruptedError):
            generate(model, [list(range(1, 11))], new, compile=compile)
    assert allocated == [slots, 10 + new]
