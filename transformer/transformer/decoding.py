"""Greedy decoding and batched beam search with the length penalty of Wu et al. (2016), as used in section 6.1.

Both decode incrementally (`Transformer.decode_step`: cached self-attention keys/values, cross-attention
keys/values computed once per source) and drop finished sentences from the batch as they complete.
The output length is limited per sentence to  max_len_a * source_length + max_len_b  tokens (eos included;
the paper: input length + 50), and never beyond the model's max_len; at the limit, eos is forced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from .model import Transformer


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]  # without bos / eos
    score: float  # log p(y | x) / lp(|y|)   (|y| counts the eos)
    log_prob: float


def length_penalty(length: int | Tensor, alpha: float) -> float | Tensor:
    """lp(Y) = ((5 + |Y|) / 6)^alpha  (Wu et al. 2016, eq. 14); alpha = 0.6 in the paper."""
    return ((5.0 + length) / 6.0) ** alpha


def _limits(model: Transformer, src: Tensor, max_len: int | None, a: float, b: int) -> Tensor:
    """Per-sentence maximum output length in tokens (eos included), (B,)."""
    src_len = (src != model.config.pad_id).sum(1)
    limit = torch.full_like(src_len, max_len) if max_len is not None else (a * src_len.float()).long() + b
    return limit.clamp(1, model.config.max_len)


def _force_eos(scores: Tensor, rows: Tensor, eos_id: int) -> Tensor:
    """Rows at their length limit may only emit eos (which keeps its own score: a forced eos is not free)."""
    if rows.any():
        eos = scores[rows, eos_id]
        scores = scores.clone()
        scores[rows] = float("-inf")
        scores[rows, eos_id] = eos
    return scores


@torch.no_grad()
def greedy_decode(
    model: Transformer, src: Tensor, max_len: int | None = None, *, max_len_a: float = 1.0, max_len_b: int = 50, min_len: int = 0
) -> list[list[int]]:
    """argmax decoding: src (B, S) right-padded -> B token lists (no bos/eos); eos is banned before min_len tokens."""
    cfg = model.config
    memory, src_mask = model.encode(src)
    limits = _limits(model, src, max_len, max_len_a, max_len_b)
    batch = src.shape[0]
    out = torch.full((batch, int(limits.max())), cfg.pad_id, dtype=torch.long, device=src.device)
    cache = model.start_cache(memory, src_mask)
    active = torch.arange(batch, device=src.device)  # original row of each cache row
    tokens = torch.full((batch, 1), cfg.bos_id, dtype=torch.long, device=src.device)
    for t in range(out.shape[1]):
        logits = model.decode_step(tokens, cache)[:, -1].float()  # (n, V)
        if t < min_len:
            logits[:, cfg.eos_id] = float("-inf")
        logits = _force_eos(logits, t + 1 >= limits[active], cfg.eos_id)
        nxt = logits.argmax(-1)  # (n,)
        out[active, t] = nxt
        running = nxt != cfg.eos_id
        if not running.all():
            keep = running.nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            cache, active, nxt = cache.select(keep), active[keep], nxt[keep]
        tokens = nxt[:, None]
    return [_strip(row, cfg.eos_id, cfg.pad_id) for row in out.tolist()]


@torch.no_grad()
def beam_search(
    model: Transformer,
    src: Tensor,
    beam_size: int = 4,
    alpha: float = 0.6,
    max_len_a: float = 1.0,
    max_len_b: int = 50,
    *,
    max_len: int | None = None,
    min_len: int = 0,
    early_stopping: bool = True,
) -> list[list[Hypothesis]]:
    """Batched beam search; per sentence, up to beam_size hypotheses sorted by penalised score (best first).

    Each step expands the K alive hypotheses of every sentence, keeps the top 2K candidates (so at least K
    do not end in eos), moves those ending in eos that rank among the top K into the sentence's K-best
    finished list with score log p / lp(length), and continues with the K best that do not end in eos.
    Early stopping: a sentence stops when its worst finished score is at least the best score any alive
    hypothesis could still reach, log p_alive / lp(limit) (log-probabilities only decrease, lp only grows
    for alpha >= 0), so stopping never changes the result.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    cfg = model.config
    k, device = beam_size, src.device
    memory, src_mask = model.encode(src)
    limits = _limits(model, src, max_len, max_len_a, max_len_b)
    batch, steps = src.shape[0], int(limits.max())
    neg_inf = float("-inf")

    cache = model.start_cache(memory, src_mask).select(torch.arange(batch, device=device).repeat_interleave(k))
    active = torch.arange(batch, device=device)  # original sentence of each of the n running sentences
    alive_logp = torch.full((batch, k), neg_inf, device=device)
    alive_logp[:, 0] = 0.0  # one start hypothesis per sentence, the other beams empty
    alive_seq = torch.empty((batch, k, 0), dtype=torch.long, device=device)
    fin_seq = torch.full((batch, k, steps), cfg.pad_id, dtype=torch.long, device=device)
    fin_score = torch.full((batch, k), neg_inf, device=device)
    fin_logp = torch.full((batch, k), neg_inf, device=device)
    tokens = torch.full((batch * k, 1), cfg.bos_id, dtype=torch.long, device=device)

    for t in range(steps):
        n = active.numel()
        logits = model.decode_step(tokens, cache)[:, -1].float()  # (n*K, V)
        at_limit = (t + 1 >= limits[active]).repeat_interleave(k)
        logp = torch.log_softmax(logits, dim=-1)
        if t < min_len:  # at least min_len tokens before eos
            logp[:, cfg.eos_id] = float("-inf")
        logp = _force_eos(logp, at_limit, cfg.eos_id)
        vocab = logp.shape[-1]
        cand = rearrange(
            alive_logp[:, :, None] + rearrange(logp, "(n k) v -> n k v", k=k), "n k v -> n (k v)"
        )  # every beam's every next token
        top_logp, top_idx = cand.topk(min(2 * k, k * vocab), dim=-1)  # (n, 2K)
        origin, token = top_idx // vocab, top_idx % vocab
        cand_seq = torch.cat([alive_seq.gather(1, origin[:, :, None].expand(-1, -1, t)), token[:, :, None]], dim=2)  # (n, 2K, t+1)
        ends = token == cfg.eos_id
        # a hypothesis may finish only if its eos candidate ranks among the K best (else it is dropped);
        # so beam_size=1 with alpha=0 is exactly greedy decoding
        finishes = ends & (torch.arange(ends.shape[1], device=device) < k)

        # finished: merge candidates ending in eos into the K best finished hypotheses
        eos_logp = torch.where(finishes, top_logp, neg_inf)
        merged_score = torch.cat([fin_score[active], eos_logp / length_penalty(t + 1, alpha)], dim=1)  # (n, 3K)
        merged_logp = torch.cat([fin_logp[active], eos_logp], dim=1)
        padded = torch.full((n, cand_seq.shape[1], steps), cfg.pad_id, dtype=torch.long, device=device)
        padded[:, :, : t + 1] = cand_seq
        merged_seq = torch.cat([fin_seq[active], padded], dim=1)  # (n, 3K, steps)
        best_score, pick = merged_score.topk(k, dim=-1)
        fin_score[active] = best_score
        fin_logp[active] = merged_logp.gather(1, pick)
        fin_seq[active] = merged_seq.gather(1, pick[:, :, None].expand(-1, -1, steps))

        # alive: the K best candidates not ending in eos
        alive_logp, keep = torch.where(ends, neg_inf, top_logp).topk(k, dim=-1)  # (n, K)
        origin, token = origin.gather(1, keep), token.gather(1, keep)
        alive_seq = cand_seq.gather(1, keep[:, :, None].expand(-1, -1, t + 1))

        done = (t + 1 >= limits[active]) | torch.isinf(alive_logp[:, 0])
        if early_stopping:
            bound = alive_logp[:, 0] / length_penalty(limits[active].float(), alpha)
            done |= fin_score[active, -1] >= bound
        rows = rearrange(torch.arange(n, device=device)[:, None] * k + origin, "n k -> (n k)")  # reorder the cache to the new beams
        if done.any():
            running = (~done).nonzero().squeeze(1)
            if running.numel() == 0:
                break
            rows = rearrange(rearrange(rows, "(n k) -> n k", k=k)[running], "n k -> (n k)")
            cache = cache.select(rows)  # sentences dropped: select cross-attention rows too
            active, alive_logp, alive_seq, token = active[running], alive_logp[running], alive_seq[running], token[running]
        else:
            cache = cache.select(rows, cross=False)  # beams of one sentence share its cross-attention keys/values
        tokens = token.reshape(-1, 1)

    results = []
    for b in range(batch):
        hyps = [
            Hypothesis(_strip(fin_seq[b, j].tolist(), cfg.eos_id, cfg.pad_id), float(fin_score[b, j]), float(fin_logp[b, j]))
            for j in range(k)
            if torch.isfinite(fin_score[b, j])
        ]
        results.append(hyps)
    return results


def _strip(tokens: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Tokens before the first eos (pads removed)."""
    out = []
    for token in tokens:
        if token == eos_id:
            break
        if token != pad_id:
            out.append(token)
    return out
