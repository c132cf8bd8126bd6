"""KV cache (kv heads only, in place), cached vs uncached decoding, left-padded batches, sampling, bad input."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from x_llama import KVCache, Llama, LlamaConfig, generate, stream_generate
from x_llama.generation import draw_categorical, sample_next


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_cache_memory_scales_with_kv_heads(n_kv_heads):
    config = LlamaConfig.from_preset("tiny", n_heads=4, n_kv_heads=n_kv_heads)
    cache = KVCache(config, batch_size=3, max_len=50)
    per_element = 4  # float32
    expected = 2 * config.n_layers * 3 * 50 * n_kv_heads * config.head_dim * per_element
    assert cache.nbytes == expected
    mha = KVCache(LlamaConfig.from_preset("tiny", n_heads=4, n_kv_heads=4), batch_size=3, max_len=50)
    assert mha.nbytes == cache.nbytes * (4 // n_kv_heads)


def test_cache_is_updated_in_place(tiny_model):
    cache = tiny_model.new_cache(1, 20)
    pointer = cache.k.data_ptr()
    tiny_model(torch.tensor([[1, 2, 3]]), cache=cache)
    tiny_model(torch.tensor([[4]]), cache=cache)
    assert cache.k.data_ptr() == pointer and cache.length == 4
    assert cache.k[:, :, :, 4:].abs().sum() == 0 and cache.k[:, :, :, :4].abs().sum() > 0


def test_prefill_then_decode_equals_full_forward(tiny_model):
    tokens = torch.randint(0, tiny_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = tiny_model(tokens)
        cache = tiny_model.new_cache(2, 16)
        pieces = [tiny_model(tokens[:, :10], cache=cache)]
        pieces += [tiny_model(tokens[:, t : t + 1], cache=cache) for t in range(10, 16)]
    assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)


def test_cached_and_uncached_greedy_give_identical_tokens(tiny_model):
    prompts = [[1, 7, 3, 9, 12], [1, 4]]
    cached = generate(tiny_model, prompts, 30, use_cache=True)
    uncached = generate(tiny_model, prompts, 30, use_cache=False)
    assert cached == uncached
    assert len(cached[0]) == 30


def test_left_padded_batch_equals_each_prompt_alone(tiny_model):
    prompts = [[1, 5, 8, 13, 21, 34, 55], [1, 2], [1, 40, 41, 42]]
    batched = generate(tiny_model, prompts, 15, return_logprobs=True)
    for row, prompt in enumerate(prompts):
        alone = generate(tiny_model, [prompt], 15, return_logprobs=True)
        assert batched.tokens[row] == alone.tokens[0]
        assert_close(torch.tensor(batched.logprobs[row]), torch.tensor(alone.logprobs[0]), atol=1e-5, rtol=0)


def test_left_padded_forward_matches_unpadded_rows(tiny_model):
    short, long = torch.tensor([[1, 9, 4]]), torch.tensor([[1, 3, 3, 7, 2, 8]])
    padded = torch.cat((torch.cat((torch.zeros(1, 3, dtype=torch.long), short), 1), long))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        logits = tiny_model(padded, attention_mask=mask)
        assert_close(logits[0, 3:], tiny_model(short)[0], atol=1e-5, rtol=0)
        assert_close(logits[1], tiny_model(long)[0], atol=1e-5, rtol=0)


def test_eos_truncates_each_row(tiny_model):
    prompts = [[1, 2, 3], [1, 9]]
    free = generate(tiny_model, prompts, 12)
    # make row 0 stop at its 4th, then its 5th token (first occurrences at an odd and an even index)
    positions = sorted({free[0].index(free[0][3]), free[0].index(free[0][4])})
    assert {p % 2 for p in positions} == {0, 1}, f"the tiny model's greedy tokens changed: {free[0]}"
    for position in positions:
        eos = free[0][position]
        stopped = generate(tiny_model, prompts, 12, eos_id=eos)
        assert stopped[0] == free[0][: position + 1]
        expected_1 = free[1][: free[1].index(eos) + 1] if eos in free[1] else free[1]
        assert stopped[1] == expected_1
        # decoding itself stops once every row has its EOS: the stream of row 0 alone ends there
        assert list(stream_generate(tiny_model, prompts[0], 12, eos_id=eos)) == free[0][: position + 1]
    never = next(t for t in range(tiny_model.config.vocab_size) if t not in free[0] + free[1])
    assert generate(tiny_model, prompts, 12, eos_id=never) == free  # an EOS that never comes cuts nothing


def test_streaming_equals_batch_generation(tiny_model):
    assert list(stream_generate(tiny_model, [1, 5, 6], 8)) == generate(tiny_model, [[1, 5, 6]], 8)[0]  # both greedy by default
    generator = torch.Generator().manual_seed(11)
    streamed = list(stream_generate(tiny_model, [1, 5, 6], 20, temperature=1.0, top_k=10, generator=generator))
    generator = torch.Generator().manual_seed(11)
    assert streamed == generate(tiny_model, [[1, 5, 6]], 20, temperature=1.0, top_k=10, generator=generator)[0]


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_model):
    greedy = generate(tiny_model, [[1, 3]], 10)
    generator = torch.Generator().manual_seed(0)
    assert generate(tiny_model, [[1, 3]], 10, temperature=1.5, top_k=1, generator=generator) == greedy
    assert generate(tiny_model, [[1, 3]], 10, temperature=1.5, top_p=1e-6, generator=generator) == greedy


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert all(sample_next(logits.flip(-1)).tolist() == [3] for _ in range(20))  # temperature 0 (argmax) by default
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, top_k=2, generator=generator) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}
    draws = torch.stack([sample_next(logits, 1.0, top_p=0.7, generator=generator) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8: the nucleus is the first two
    draws = torch.stack([sample_next(logits, 1.0, generator=generator) for _ in range(2000)])
    frequencies = torch.bincount(draws.flatten(), minlength=4).float() / 2000
    assert_close(frequencies, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04, rtol=0)


def test_draw_categorical_draws_each_row_from_its_own_distribution():
    """Inverse-CDF sampling: 20,000 draws per row land on each index in proportion to the row's weights, which need
    not sum to 1 (each row is normalised by its own total), and an index of weight 0 is never drawn, wherever it is
    (first, between, last)."""
    weights = torch.tensor(
        [
            [0.0, 0.1, 0.0, 0.6, 0.3],  # zeros first and in between
            [2.0, 1.0, 0.5, 0.5, 0.0],  # sums to 4; a zero last
            [0.2, 0.2, 0.2, 0.2, 0.2],
        ]
    )
    generator = torch.Generator().manual_seed(0)
    n = 20_000
    draws = torch.stack([draw_categorical(weights, generator) for _ in range(n)])  # (n, 3)
    expected = weights / weights.sum(-1, keepdim=True)
    for row in range(3):
        frequencies = torch.bincount(draws[:, row], minlength=5).double() / n
        assert_close(frequencies, expected[row].double(), atol=0.015, rtol=0)  # 4.7 standard errors at p = 0.5
        assert (frequencies[expected[row] == 0] == 0).all()


def test_draw_categorical_never_returns_a_zero_weight_index_when_u_rounds_up_to_the_total(monkeypatch):
    """u * total can round up to the total itself; the draw then falls on the last index of positive weight, not on
    the zero-weight entries after it (nor past the end)."""
    monkeypatch.setattr(torch, "rand", lambda shape, **kwargs: torch.ones(shape, dtype=kwargs.get("dtype")))
    weights = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert draw_categorical(weights).tolist() == [1, 3]


def test_logprobs_are_those_of_the_model(tiny_model):
    out = generate(tiny_model, [[1, 2, 3]], 3, return_logprobs=True)
    sequence = torch.tensor([[1, 2, 3] + out.tokens[0]])
    with torch.no_grad():
        logp = tiny_model(sequence).log_softmax(-1)[0, 2:-1].gather(-1, sequence[0, 3:, None]).squeeze(-1)
    assert_close(torch.tensor(out.logprobs[0]), logp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_sampled_logprobs_are_those_of_the_tempered_distribution(tiny_model, temperature):
    """log softmax(logits / T) at the sampled token, for T below and above 1 (without top-k / top-p filtering)."""
    generator = torch.Generator().manual_seed(3)
    out = generate(tiny_model, [[1, 2, 3]], 4, temperature=temperature, generator=generator, return_logprobs=True)
    sequence = torch.tensor([[1, 2, 3] + out.tokens[0]])
    with torch.no_grad():
        logits = tiny_model(sequence)[0, 2:-1] / temperature
    logp = logits.log_softmax(-1).gather(-1, sequence[0, 3:, None]).squeeze(-1)
    assert_close(torch.tensor(out.logprobs[0]), logp, atol=1e-5, rtol=0)


# ---- bad input ---------------------------------------------------------------------------------------------


def test_empty_prompt_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(tiny_model, [[1, 2], []], 5)
    with pytest.raises(ValueError, match="empty input"):
        tiny_model(torch.zeros(1, 0, dtype=torch.long))


def test_prompt_longer_than_max_seq_len_is_a_clear_error(tiny_model):
    too_long = [1] * (tiny_model.config.max_seq_len + 1)
    with pytest.raises(ValueError, match="more than max_seq_len"):
        generate(tiny_model, [too_long], 1)
    with pytest.raises(ValueError, match="exceeds max_seq_len=64; lower max_new_tokens to 4 or shorten"):
        generate(tiny_model, [[1] * 60], 10)
    with pytest.raises(ValueError, match="lower max_new_tokens to 44 or shorten"):  # the room is 64 - 20
        generate(tiny_model, [[1] * 20], 50)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        tiny_model(torch.ones(1, tiny_model.config.max_seq_len + 1, dtype=torch.long))


def test_out_of_vocabulary_ids_are_a_clear_error(tiny_model):
    vocab = tiny_model.config.vocab_size
    for bad in (vocab, -1):
        with pytest.raises(ValueError, match=r"outside \[0, vocab_size=97\)"):
            generate(tiny_model, [[1, bad]], 3)
    with pytest.raises(ValueError, match=r"outside \[0, vocab_size=97\): \[97, 98, 99, 100, 101\]$"):  # the first 5
        generate(tiny_model, [[1, *range(vocab, vocab + 8)]], 3)
    with pytest.raises(ValueError, match="token ids must lie in"):
        tiny_model(torch.tensor([[1, vocab + 5]]))
    with pytest.raises(ValueError, match="padded with -1"):
        tiny_model(torch.tensor([[-1, 3]]))


def test_a_single_flat_prompt_is_rejected_with_a_hint(tiny_model):
    for not_a_list_of_lists in ([1, 2, 3], torch.tensor([[1, 2, 3]]), "And God said", range(3)):
        with pytest.raises(TypeError, match="wrap a single prompt in a list"):
            generate(tiny_model, not_a_list_of_lists, 3)


def test_bf16_model_keeps_float32_rope_tables(tiny_config):
    model = Llama(tiny_config).to(torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.dtype == torch.bfloat16 and model.rope_cos.dtype == torch.float32


@pytest.mark.parametrize("use_cache", [True, False])
def test_decoding_n_tokens_takes_n_forward_passes(tiny_model, use_cache):
    """One prefill and n - 1 decode steps: the n-th token needs no forward pass after it."""
    calls = []
    handle = tiny_model.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        out = generate(tiny_model, [[1, 7, 3], [1, 4]], 6, use_cache=use_cache)
    finally:
        handle.remove()
    assert [len(row) for row in out] == [6, 6] and len(calls) == 6


def test_a_long_decode_also_stops_after_its_last_token():
    """300 tokens take 300 forward passes too: the last-step test compares numbers past CPython's small-int cache
    (a test written with `is` would pass at 6 tokens and run a 301st forward here)."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=97, max_seq_len=320)).eval()
    calls = []
    handle = model.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        out = generate(model, [[1, 7, 3]], 300)
    finally:
        handle.remove()
    assert len(out[0]) == 300 and len(calls) == 300


def test_top_p_boundary_and_top_k_past_the_vocabulary():
    """The nucleus is the smallest set whose mass reaches top_p: with four equally likely tokens and top_p = 0.5
    it is two tokens (the third's preceding mass, exactly 0.5, already reaches it). top_k at or past the vocabulary
    size filters nothing."""
    generator = torch.Generator().manual_seed(0)
    uniform = torch.zeros(1, 4)
    draws = {int(sample_next(uniform, 1.0, top_p=0.5, generator=generator)) for _ in range(200)}
    assert len(draws) == 2
    for top_k in (4, 9):
        draws = {int(sample_next(uniform, 1.0, top_k=top_k, generator=generator)) for _ in range(200)}
        assert draws == {0, 1, 2, 3}


def test_token_id_zero_is_a_valid_prompt_token(tiny_model):
    assert len(generate(tiny_model, [[0, 5, 0]], 3)[0]) == 3


def test_generate_and_stream_generate_use_the_cache_by_default(tiny_model):
    """After the prompt, each decode step feeds the model one new token (the cache holds the rest)."""
    lengths = []
    handle = tiny_model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    try:
        list(stream_generate(tiny_model, [1, 7, 3], 4))
        generate(tiny_model, [[1, 7, 3]], 4)
    finally:
        handle.remove()
    assert lengths == [3, 1, 1, 1] * 2


def test_sampled_tokens_have_one_id_per_row():
    generator = torch.Generator().manual_seed(0)
    assert sample_next(torch.zeros(3, 5), 1.0, generator=generator).shape == (3,)
    assert sample_next(torch.zeros(3, 5)).shape == (3,)
