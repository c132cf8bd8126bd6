"""A simulated pool of labelers of unequal reliability, and the aggregation of their votes (after Yamagata et al. 2021,
"Reinforcement Learning with Feedback from Multiple Humans with Diverse Skills", arXiv:2111.08596).

The truth of a pair is the ground-truth labeller's preference (`reward.build_preferences`: the higher VADER score
wins, or Bradley-Terry noise around it). A pool of n labelers reports it through a "one-coin" channel:

    P(labeler k votes for the truly preferred completion) = c_k                       (`simulate_votes`)

honest labelers draw c_k ~ U[reliability_low, reliability_high], adversarial ones c_k = 1 - U[low, high] (< 0.5: they
mostly flip). Each prompt is labelled by `per_prompt` labelers drawn at random, each voting on every one of its pairs.

Aggregation (`aggregate`), the three methods compared in the README:
- "majority": each pair's hard label by vote count (ties dropped);
- "pool": every vote is a training pair of equal weight (naive pooling);
- "weighted": reliabilities estimated by EM (`estimate_reliabilities`), each pair's posterior probability
  q = P(a > b | votes) becomes a soft label (`losses.soft_reward_model_loss`), oriented so that q >= 0.5.

The EM (Dawid & Skene 1979 with one reliability per labeler, MAP under a Beta(alpha, beta) prior on each c_k). For a
pair p with hidden truth z_p in {1 (a > b), 0 (b > a)}, prior P(z_p = 1) = pi_p and votes v_pk in {1, 0}:

    E-step:  logit q_p = logit pi_p + sum_k (2 v_pk - 1) logit c_k
    M-step:  c_k = (sum_p [v_pk q_p + (1 - v_pk)(1 - q_p)] + alpha - 1) / (n_k + alpha + beta - 2)

n_k the votes of labeler k. With pi_p = sigma(r(a) - r(b)) (a reward model's Bradley-Terry preference) this is the joint
model of the README; the reward stage runs it with pi_p = 1/2 (votes only, before the reward model exists).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np

AGGREGATIONS = ("majority", "pool", "weighted")


@dataclass
class Pool:
    reliability: np.ndarray  # (n,) true c_k
    adversarial: np.ndarray  # (n,) bool


def draw_pool(n: int, adversarial: float, low: float, high: float, seed: int) -> Pool:
    """n labelers: round(adversarial * n) of them (chosen at random) adversarial with c = 1 - U[low, high], the rest
    honest with c ~ U[low, high]."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(low, high, size=n)
    bad = np.zeros(n, dtype=bool)
    bad[rng.permutation(n)[: round(adversarial * n)]] = True
    return Pool(reliability=np.where(bad, 1.0 - c, c), adversarial=bad)


def simulate_votes(records: list[dict], pool: Pool, per_prompt: int, seed: int) -> list[list[list[int]]]:
    """Per record, its votes [[winner, loser, labeler], ...]: `per_prompt` distinct labelers each vote on every
    (true winner, true loser) pair of the record's "pairs", keeping the truth with probability c_k."""
    rng = np.random.default_rng(seed + 1)
    n = len(pool.reliability)
    out = []
    for r in records:
        who = rng.permutation(n)[:per_prompt]
        votes = []
        for w, lo in r["pairs"]:
            keep = rng.random(len(who)) < pool.reliability[who]
            votes += [[w, lo, int(k)] if ok else [lo, w, int(k)] for k, ok in zip(who, keep)]
        out.append(votes)
    return out


def _flat(votes: list[list[list[int]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, int, int]]]:
    """Votes as arrays: pair index, labeler, v (1 = the pair's lower-index completion a won); pairs as (record, a, b)."""
    index: dict[tuple[int, int, int], int] = {}
    pair_id, labeler, v = [], [], []
    for i, record_votes in enumerate(votes):
        for w, lo, k in record_votes:
            key = (i, min(w, lo), max(w, lo))
            pair_id.append(index.setdefault(key, len(index)))
            labeler.append(k)
            v.append(int(w < lo))
    return np.asarray(pair_id, dtype=np.int64), np.asarray(labeler, dtype=np.int64), np.asarray(v, dtype=np.float64), list(index)


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def em_posteriors(
    pair_id: np.ndarray,
    labeler: np.ndarray,
    v: np.ndarray,
    n_labelers: int,
    prior_logit: np.ndarray | None = None,
    alpha: float = 2.0,
    beta: float = 2.0,
    iterations: int = 200,
    tol: float = 1e-7,
) -> tuple[np.ndarray, np.ndarray]:
    """(c, q): MAP reliabilities (n_labelers,) and posteriors q_p = P(a > b | votes) (n_pairs,) of the one-coin model
    (module docstring). Initialised at majority vote (q = share of votes for a), then M, E, M, ... until c moves
    less than tol. prior_logit: logit pi_p per pair (None = 0, no preference a priori)."""
    n_pairs = int(pair_id.max()) + 1 if len(pair_id) else 0
    prior = np.zeros(n_pairs) if prior_logit is None else np.asarray(prior_logit, dtype=np.float64)
    q = np.bincount(pair_id, weights=v, minlength=n_pairs) / np.maximum(np.bincount(pair_id, minlength=n_pairs), 1)
    counts = np.bincount(labeler, minlength=n_labelers)
    c = np.full(n_labelers, 0.5)
    for _ in range(iterations):
        agree = v * q[pair_id] + (1 - v) * (1 - q[pair_id])  # P(vote agrees with the truth | current q)
        new_c = (np.bincount(labeler, weights=agree, minlength=n_labelers) + alpha - 1) / (counts + alpha + beta - 2)
        new_c = np.clip(new_c, 1e-6, 1 - 1e-6)  # an unused labeler with alpha = beta = 1 would be 0/0
        new_c[counts + alpha + beta - 2 <= 0] = 0.5
        done = np.max(np.abs(new_c - c)) < tol
        c = new_c
        logit_q = prior + np.bincount(pair_id, weights=(2 * v - 1) * _logit(c)[labeler], minlength=n_pairs)
        q = 1.0 / (1.0 + np.exp(-logit_q))
        if done:
            break
    return c, q


def estimate_reliabilities(votes: list[list[list[int]]], n_labelers: int, alpha: float = 2.0, beta: float = 2.0) -> np.ndarray:
    """The EM's reliability estimates from votes alone (pi_p = 1/2)."""
    pair_id, labeler, v, _ = _flat(votes)
    return em_posteriors(pair_id, labeler, v, n_labelers, alpha=alpha, beta=beta)[0]


def aggregate(
    records: list[dict],
    votes: list[list[list[int]]],
    method: str,
    n_labelers: int,
    alpha: float = 2.0,
    beta: float = 2.0,
    rm_scores: list[list[float]] | None = None,
):
    """Training pairs per record from the votes: (pairs, targets or None, estimated c or None).

    majority: [(winner, loser)] by vote count, ties dropped; pool: every vote; weighted: one pair per voted pair,
    the posterior's favourite first, with target q = P(first > second | votes) >= 0.5. rm_scores (per record, per
    completion): a reward model's scores r, making the weighted EM's prior pi_p = sigma(r_a - r_b) (the joint model)."""
    if method == "pool":
        return [[(w, lo) for w, lo, _ in rv] for rv in votes], None, None
    pair_id, labeler, v, keys = _flat(votes)
    n_pairs = len(keys)
    pairs: list[list[tuple[int, int]]] = [[] for _ in records]
    if method == "majority":
        for_a = np.bincount(pair_id, weights=v, minlength=n_pairs)
        total = np.bincount(pair_id, minlength=n_pairs)
        for (i, a, b), fa, t in zip(keys, for_a, total):
            if 2 * fa != t:
                pairs[i].append((a, b) if 2 * fa > t else (b, a))
        return pairs, None, None
    if method == "weighted":
        prior = None if rm_scores is None else np.array([rm_scores[i][a] - rm_scores[i][b] for i, a, b in keys])
        c, q = em_posteriors(pair_id, labeler, v, n_labelers, prior_logit=prior, alpha=alpha, beta=beta)
        targets: list[list[float]] = [[] for _ in records]
        for (i, a, b), qa in zip(keys, q):
            pairs[i].append((a, b) if qa >= 0.5 else (b, a))
            targets[i].append(float(max(qa, 1.0 - qa)))
        return pairs, targets, c
    raise ValueError(f"aggregate: unknown method {method!r}; use one of {AGGREGATIONS}")


def label_accuracy(records: list[dict], pairs: list[list[tuple[int, int]]]) -> float:
    """Share of the aggregated pairs that agree with the truth (the records' "pairs")."""
    right = total = 0
    for r, ps in zip(records, pairs):
        truth = {tuple(p) for p in r["pairs"]}
        right += sum(tuple(p) in truth for p in ps)
        total += len(ps)
    return right / max(total, 1)


def apply_pool(records: list[dict], cfg) -> tuple[list[dict], dict]:
    """The reward stage's entry point: relabel ground-truth records by the pool of `cfg` (a LabelerConfig).

    n = 1 returns the records untouched (the single ground-truth labeller). Otherwise each record keeps its truth as
    "truth_pairs", gets its "votes" and, as "pairs" (what the RM and DPO train on), the aggregated pairs; "targets"
    (soft labels, one per pair) with the weighted aggregation. Returns (records, a summary for labelers.json)."""
    if cfg.n == 1:
        return records, {}
    pool = draw_pool(cfg.n, cfg.adversarial, cfg.reliability_low, cfg.reliability_high, cfg.seed)
    votes = simulate_votes(records, pool, cfg.per_prompt, cfg.seed)
    summary: dict = {"reliability": pool.reliability.tolist(), "adversarial": pool.adversarial.tolist()}
    for method in AGGREGATIONS:  # every method's label accuracy, for the README's table; the configured one is used
        pairs, targets, c = aggregate(records, votes, method, cfg.n, cfg.prior_alpha, cfg.prior_beta)
        summary[f"label_accuracy/{method}"] = label_accuracy(records, pairs)
        summary[f"pairs/{method}"] = sum(map(len, pairs))
        if method == "weighted":
            summary.update(reliability_report(pool, c))
        if method == cfg.aggregation:
            chosen = (pairs, targets)
    out = []
    for r, rv, ps, ts in zip(records, votes, chosen[0], chosen[1] or [None] * len(records)):
        new = copy.copy(r)
        new["truth_pairs"], new["votes"], new["pairs"] = r["pairs"], rv, [list(p) for p in ps]
        if ts is not None:
            new["targets"] = ts
        out.append(new)
    return out, summary


def reliability_report(pool: Pool, estimated: np.ndarray) -> dict:
    """Estimated against true reliability: Pearson correlation, mean absolute error, adversaries flagged (c < 0.5)."""
    true = pool.reliability
    corr = float(np.corrcoef(true, estimated)[0, 1]) if np.std(true) > 0 and np.std(estimated) > 0 else math.nan
    flagged = estimated < 0.5
    return {
        "estimated": estimated.tolist(),
        "reliability_pearson": corr,
        "reliability_mae": float(np.abs(true - estimated).mean()),
        "adversaries": int(pool.adversarial.sum()),
        "adversaries_flagged": int((flagged & pool.adversarial).sum()),
        "honest_flagged": int((flagged & ~pool.adversarial).sum()),
    }
