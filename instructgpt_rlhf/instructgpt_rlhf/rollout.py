"""Sampling completions from a policy (x_llama's KV-cached, left-padded batched `generate`) and scoring them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from x_llama import Llama, generate

from .config import SamplingConfig
from .data import Batch, collate
from .losses import sequence_logprobs, token_logprobs
from .model import policy_logits


@torch.no_grad()
def sample_completions(policy: Llama, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, eos_id: int) -> list[list[int]]:
    """One completion per prompt: plain softmax sampling at `sampling.temperature` (no top-k/top-p, so the KL
    estimate log pi - log ref is an unbiased sample of a true KL), cut after EOS, in batches of sampling.batch_size;
    with sampling.compile, each decoding step runs as one compiled graph. Draws from torch's global RNG (so checkpoints capture it)."""
    out: list[list[int]] = []
    for start in range(0, len(prompts), sampling.batch_size):
        chunk = [list(p) for p in prompts[start : start + sampling.batch_size]]
        out += generate(
            policy,
            chunk,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            eos_id=eos_id,
            use_cache=True,
            compile=sampling.compile,
        )
    return out


@torch.no_grad()
def completion_logprobs(model: Llama, prompts, completions, batch_size: int = 64, temperature: float = 1.0) -> torch.Tensor:
    """log pi(y | x) for each (prompt, completion), summed over completion tokens in fp32. -> (N,)"""
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = collate(prompts[start : start + batch_size], completions[start : start + batch_size])
        logits = policy_logits(model, batch)
        if temperature != 1.0:
            logits = logits / temperature
        out.append(sequence_logprobs(logits, batch.completion_labels, batch.label_mask))
    return torch.cat(out) if out else torch.zeros(0)


def per_token_logprobs(model: Llama, batch: Batch, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y_t | ...) (B,C), logits (B,C,V)) under softmax(logits / temperature): the rollout temperature is
    applied identically when the loss re-evaluates the sampled tokens."""
    logits = policy_logits(model, batch)
    return token_logprobs(logits, batch.completion_labels, temperature), logits


def decode_texts(tokenizer, prompts, completions) -> list[str]:
    """The text the labeller reads: prompt + completion, without bos/eos."""
    return [tokenizer.decode(list(p) + list(c)) for p, c in zip(prompts, completions)]
