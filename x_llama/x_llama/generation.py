"""Autoregressive decoding: greedy, temperature, top-k and nucleus (top-p, Holtzman et al. 2020) sampling,
batched with left padding and per-row RoPE positions, with or without the KV cache (README, "Decoding").

With the cache, the prompt is processed once (prefill, O(T) tokens), then each step feeds one token and
attends to the cached keys/values; without it, every step re-runs the whole prefix (O(T^2) tokens in total).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import Llama


@dataclass
class Generation:
    """`generate(..., return_logprobs=True)` result: new tokens per row and log p(token) under softmax(logits /
    temperature) *before* top-k/top-p filtering (plain softmax when greedy). Without filtering that is the sampling
    policy's log-prob; with filtering the token came from the truncated, renormalised distribution instead."""

    tokens: list[list[int]]
    logprobs: list[list[float]]


def sample_next(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids (B,) from logits (B, V). temperature 0 = argmax; else sample from softmax(logits / T)
    restricted to the k most likely tokens and/or the smallest set whose probability reaches top_p."""
    if temperature == 0.0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_scores.softmax(-1) >= top_p  # mass *before* this token already reaches top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    return draw_categorical(scores.softmax(-1), generator)


def draw_categorical(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One index per row of probs (B, V), drawn with probability probs[b, i] / sum_i probs[b, i], by inverting the
    row's cumulative distribution at one uniform number: index i is drawn when cdf[i - 1] <= u < cdf[i]. A token of
    probability 0 has cdf[i - 1] = cdf[i], so it is never drawn.

    One random number per row, where `torch.multinomial` draws one exponential per vocabulary entry: with a
    2,048-token vocabulary at batch 64 that was a third of a sampled rollout's time. The cumulative sums are in
    float64 (float32 on Apple's MPS, which has no float64), so rounding does not move probability between tokens."""
    dtype = torch.float32 if probs.device.type == "mps" else torch.float64
    cdf = probs.to(dtype).cumsum(-1)  # (B, V)
    total = cdf[:, -1:]  # (B, 1): 1 up to the softmax's rounding
    u = torch.rand(total.shape, dtype=dtype, device=probs.device, generator=generator) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total even if the product rounds up
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)  # (B,): the number of entries with cdf <= u


def check_prompts(model: Llama, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    config = model.config
    if isinstance(prompts, Tensor) or not isinstance(prompts, (list, tuple)) or (prompts and isinstance(prompts[0], int)):
        raise TypeError("prompts must be a list of token-id lists, e.g. [[1, 306, 763]]; wrap a single prompt in a list")
    if not prompts:
        raise ValueError("no prompts given")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {row} is empty; start it with at least the BOS token (id 1)")
        if len(prompt) > config.max_seq_len:
            raise ValueError(f"prompt {row} has {len(prompt)} tokens, more than max_seq_len={config.max_seq_len}; truncate it")
        if len(prompt) + max_new_tokens > config.max_seq_len:
            raise ValueError(
                f"prompt {row} ({len(prompt)} tokens) + max_new_tokens={max_new_tokens} exceeds max_seq_len={config.max_seq_len}; "
                f"lower max_new_tokens to {config.max_seq_len - len(prompt)} or shorten the prompt"
            )
        bad = [t for t in prompt if not 0 <= int(t) < config.vocab_size]
        if bad:
            raise ValueError(f"prompt {row} has token ids outside [0, vocab_size={config.vocab_size}): {bad[:5]}")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, device=None) -> tuple[Tensor, Tensor]:
    """(B, L) tokens right-aligned, and the (B, L) mask, 1 at real tokens and 0 at the left padding."""
    length = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), length), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, length - len(prompt) :] = 1
    return tokens, mask


@torch.no_grad()
def _decode(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
    use_cache: bool,
    generator: torch.Generator | None,
    compile: bool = False,
    logprobs: bool = True,
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield (next tokens (B,), their log-probs (B,), or None with logprobs=False) step by step until max_new_tokens
    or every row hit EOS. compile=True decodes with `Llama.decode_step`'s compiled graph (needs the cache)."""
    check_prompts(model, prompts, max_new_tokens)
    if compile and not use_cache:
        raise ValueError("compile=True decodes with the KV cache; set use_cache=True")
    device = model.tok_embeddings.weight.device
    tokens, mask = left_pad(prompts, device=device)
    batch = tokens.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        if use_cache:
            length = tokens.shape[1] + max_new_tokens
            if compile:  # the compiled graph is specialised to the cache length: round it up, to compile for few lengths
                length = min(-(-length // 64) * 64, model.config.max_seq_len)
            cache = model.new_cache(batch, length)
            logits = model(tokens, cache=cache, attention_mask=mask, last_only=True)[:, -1]
        else:
            logits = model(tokens, attention_mask=mask, last_only=True)[:, -1]
        for step in range(max_new_tokens):
            next_token = sample_next(logits, temperature, top_k, top_p, generator)
            logprob = None
            if logprobs:  # a log-softmax over the vocabulary: skipped when nobody reads it
                scaled = logits.float() / (temperature if temperature > 0 else 1.0)
                logprob = scaled.log_softmax(-1).gather(-1, next_token[:, None]).squeeze(-1)
            yield next_token, logprob
            if eos_id is not None:
                finished |= next_token == eos_id
                if bool(finished.all()):
                    return
            if step == max_new_tokens - 1:
                return
            if compile:
                logits = model.decode_step(next_token[:, None], cache, compile=True)
            elif use_cache:
                logits = model(next_token[:, None], cache=cache)[:, -1]
            else:
                tokens = torch.cat((tokens, next_token[:, None]), 1)
                mask = torch.cat((mask, torch.ones_like(mask[:, :1])), 1)
                logits = model(tokens, attention_mask=mask, last_only=True)[:, -1]
    finally:
        model.train(was_training)


def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    return_logprobs: bool = False,
    compile: bool = False,
) -> list[list[int]] | Generation:
    """New tokens for each prompt (a batch, left-padded internally), each row cut after its first EOS (kept).
    compile=True runs each decoding step as one compiled graph (`Llama.decode_step`; the first call compiles)."""
    steps_tokens, steps_logprobs = [], []
    for next_token, logprob in _decode(
        model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator, compile, logprobs=return_logprobs
    ):
        steps_tokens.append(next_token)
        steps_logprobs.append(logprob)
    all_tokens = torch.stack(steps_tokens, 1).tolist()  # (B, steps)
    kept = [row.index(eos_id) + 1 if eos_id is not None and eos_id in row else len(row) for row in all_tokens]  # up to the first EOS
    out_tokens = [row[:n] for row, n in zip(all_tokens, kept)]
    if not return_logprobs:
        return out_tokens
    all_logprobs = torch.stack(steps_logprobs, 1).tolist()
    return Generation(out_tokens, [row[:n] for row, n in zip(all_logprobs, kept)])


def stream_generate(
    model: Llama,
    prompt: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    compile: bool = False,
) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are decoded (the EOS, if reached, is yielded last)."""
    for next_token, _ in _decode(
        model, [prompt], max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator, compile, logprobs=False
    ):
        yield int(next_token[0])


def generate_command(cfg) -> str:
    """`x-llama generate`: stream a continuation of --prompt (or stdin) to stdout; returns the generated text."""
    import sys

    from axon_shared.cli import text_argument
    from axon_shared.config import ConfigError

    from .train import load_pretrained

    model, tokenizer, _ = load_pretrained(cfg.checkpoint)
    if tokenizer is None:
        raise ConfigError(f"GenerateConfig.checkpoint={cfg.checkpoint!r}: no tokenizer.model next to it, so the prompt cannot be encoded")
    prompt = text_argument(cfg.prompt, "prompt")
    ids = tokenizer.encode(prompt.strip(), bos=True)
    room = model.config.max_seq_len - len(ids)
    if cfg.max_new_tokens > room:
        raise ConfigError(
            f"GenerateConfig.max_new_tokens={cfg.max_new_tokens}: the prompt has {len(ids)} tokens and the model's context is "
            f"{model.config.max_seq_len}; lower --max_new_tokens to {room} or less" + ("" if room > 0 else " (shorten the prompt)")
        )
    generator = torch.Generator().manual_seed(cfg.seed)
    prefix = tokenizer.decode(ids)
    sys.stdout.write(prefix)
    new: list[int] = []
    shown = prefix
    for token in stream_generate(
        model,
        ids,
        cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        eos_id=tokenizer.eos_id,
        use_cache=cfg.use_cache,
        generator=generator,
        compile=cfg.compile,
    ):
        new.append(token)
        text = tokenizer.decode(ids + new)  # decode prompt + continuation: pieces join with the right spaces
        sys.stdout.write(text[len(shown) :])
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")
    return shown[len(prefix) :]
