"""Data: movie-review snippets (the demonstrations), prompts (their first 2-8 tokens) and padded batches.

One batch layout is used everywhere (SFT, reward model, DPO, PPO):

    tokens  = [pad .. pad | bos p_1 .. p_k | y_1 .. y_m eos | pad .. pad]     (B, P + C)
               left-padded prompt (P)        completion, right-padded (C)

`attention_mask` is 1 on real tokens; `completion_mask` is 1 on completion tokens, EOS included. The tokenizer
(Llama style) has no pad token, so the pad id is the unk id 0 and every loss reads the masks, never the pad id:
padding can never hide the EOS label. Logits at positions P-1 .. P+C-2 predict the completion tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

PAD_ID = 0  # SentencePiece unk; safe as a pad because every consumer masks pads out


def movie_snippets(split: str) -> list[dict]:
    """The human-rated movie-review snippets of `vader-sentiment` ({"id","source","mean","text"}) in a split."""
    return list(_movie_snippets(split))


@functools.lru_cache(maxsize=4)
def _movie_snippets(split: str) -> tuple[dict, ...]:
    from axon_shared.data import load_split

    records = load_split("vader-sentiment", split)
    movies = [r for r in records if "movie" in str(r["source"]).lower()]
    if not movies:
        sources = sorted({str(r["source"]) for r in records})
        raise ValueError(
            f"vader-sentiment/{split} has no movie-review snippets (sources: {sources}); run `axon-data prepare vader-sentiment`"
        )
    return tuple(movies)


def make_prompts(
    token_lists: Sequence[Sequence[int]], bos_id: int, min_tokens: int = 2, max_tokens: int = 8, seed: int = 0
) -> list[list[int]]:
    """Prompts as in the DPO paper's sentiment task: bos + the first k tokens of a snippet, k uniform in
    [min_tokens, max_tokens] (and shorter than the snippet, so something is left to complete)."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for ids in token_lists:
        hi = max(1, min(max_tokens, len(ids) - 1))
        lo = min(min_tokens, hi)
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        prompts.append([bos_id] + list(ids[:k]))
    return prompts


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, P+C) long
    attention_mask: torch.Tensor  # (B, P+C) long, 1 = real token
    completion_mask: torch.Tensor  # (B, P+C) long, 1 = completion token (EOS included)
    prompt_len: int  # P

    @property
    def positions(self) -> torch.Tensor:
        """RoPE positions counted from each row's first real token (so left padding changes nothing)."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def completion_labels(self) -> torch.Tensor:
        """(B, C) completion tokens; logits[:, P-1 : P+C-1] predict them."""
        return self.tokens[:, self.prompt_len :]

    @property
    def label_mask(self) -> torch.Tensor:
        """(B, C) 1 on completion tokens (EOS included), 0 on pads."""
        return self.completion_mask[:, self.prompt_len :]

    def to(self, device) -> Batch:
        return Batch(self.tokens.to(device), self.attention_mask.to(device), self.completion_mask.to(device), self.prompt_len)


def collate(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> Batch:
    """Left-pad the prompts to a common length P and right-pad the completions to C (see module docstring)."""
    if len(prompts) != len(completions):
        raise ValueError(f"collate: {len(prompts)} prompts but {len(completions)} completions")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("collate: empty prompt; every prompt needs at least the bos token")
    P = max(len(p) for p in prompts)
    C = max(1, max(len(c) for c in completions))
    B = len(prompts)
    tokens = torch.full((B, P + C), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + C), dtype=torch.long)
    comp = torch.zeros((B, P + C), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        tokens[i, P - len(p) : P] = torch.tensor(list(p), dtype=torch.long)
        attn[i, P - len(p) : P] = 1
        if len(c):
            tokens[i, P : P + len(c)] = torch.tensor(list(c), dtype=torch.long)
            attn[i, P : P + len(c)] = 1
            comp[i, P : P + len(c)] = 1
    return Batch(tokens, attn, comp, P)


def sft_examples(
    token_lists: Sequence[Sequence[int]], bos_id: int, eos_id: int, max_len: int, seed: int = 0
) -> list[tuple[list[int], list[int]]]:
    """(prompt, completion) pairs for SFT: the prompt is bos + the first 2-8 tokens (masked from the loss),
    the completion is the rest of the snippet + EOS (EOS is a label, so the model learns to stop)."""
    prompts = make_prompts(token_lists, bos_id, seed=seed)
    examples = []
    for prompt, ids in zip(prompts, token_lists):
        k = len(prompt) - 1
        completion = list(ids[k:])[: max_len - len(prompt) - 1] + [eos_id]
        examples.append((prompt, completion))
    return examples


def strip_after_eos(ids: Sequence[int], eos_id: int) -> list[int]:
    """Truncate a completion after its first EOS (EOS kept)."""
    out = []
    for t in ids:
        out.append(int(t))
        if int(t) == eos_id:
            break
    return out


def snippet_tokens(tokenizer, split: str) -> list[list[int]]:
    """Token ids (no bos/eos) of the movie snippets of a split, in the dataset's order."""
    return tokenizer.encode_batch([r["text"] for r in movie_snippets(split)])


def split_prompts(tokenizer, split: str, n: int | None, seed: int, min_tokens: int = 2, max_tokens: int = 8) -> list[list[int]]:
    """`n` prompts from the snippets of `split` (a seeded random subset; all if n is None or larger)."""
    ids = [t for t in snippet_tokens(tokenizer, split) if len(t) >= 2]
    if n is not None and n < len(ids):
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:n].tolist()
        ids = [ids[i] for i in order]
    return make_prompts(ids, tokenizer.bos_id, min_tokens, max_tokens, seed=seed)
