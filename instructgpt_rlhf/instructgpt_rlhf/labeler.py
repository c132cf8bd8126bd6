"""The ground-truth reward ("the labeller"): VADER's compound sentiment score (Hutto & Gilbert 2014).

VADER is a published, human-validated rule-and-lexicon sentiment analyser (PyPI `vaderSentiment`); none of us wrote
it, so the policy is optimised against an instrument it cannot have been tuned to. It plays the role the IMDb
sentiment classifier plays in the DPO paper's controlled-sentiment experiment (section 6.1). `human_agreement`
checks the labeller against people: the correlation of its compound score with the mean of ~20 human ratings of
each movie-review snippet.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class VaderLabeler:
    """`labeler(texts) -> list[float]`: VADER compound scores in [-1, 1] (positive = positive sentiment)."""

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: Sequence[str]) -> list[float]:
        return [float(self.analyzer.polarity_scores(t)["compound"]) for t in texts]


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of the ranks (ties get their average rank)."""

    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        # average ranks over ties
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=r)
        return sums[inverse] / counts[inverse]

    return pearson(ranks(x), ranks(y))


def human_agreement(records: Sequence[dict], labeler: VaderLabeler | None = None) -> dict[str, float]:
    """Correlation of VADER compound with the human mean rating (records: {"text", "mean"}), and the share of
    snippets whose sign agrees (over the snippets people did not rate neutral)."""
    labeler = labeler or VaderLabeler()
    scores = labeler([r["text"] for r in records])
    means = [float(r["mean"]) for r in records]
    s, m = np.asarray(scores), np.asarray(means)
    polar = m != 0
    return {
        "n": len(records),
        "pearson": pearson(scores, means),
        "spearman": spearman(scores, means),
        "sign_agreement": float((np.sign(s[polar]) == np.sign(m[polar])).mean()),
    }


def bradley_terry_labels(
    scores_a: torch.Tensor, scores_b: torch.Tensor, temperature: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Which of a pair the simulated annotator prefers: True = a. temperature 0 -> the higher score wins;
    temperature > 0 -> a wins with probability sigma((s_a - s_b) / temperature) (Bradley-Terry noise that mimics
    human disagreement; DPO paper eq. 1)."""
    if temperature <= 0:
        return scores_a > scores_b
    p = torch.sigmoid((scores_a - scores_b) / temperature)
    return torch.rand(p.shape, generator=generator) < p
