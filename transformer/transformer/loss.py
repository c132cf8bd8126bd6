"""Label-smoothed cross-entropy (section 5.4; Szegedy et al. 2016), ignoring padding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def label_smoothed_loss(logits: Tensor, target: Tensor, *, epsilon: float, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sum over non-pad positions of H(q, p) with q = (1 - eps) onehot(y) + eps / V (uniform over all V tokens).

    H(q, p) = -(1 - eps) log p_y - (eps / V) sum_k log p_k  =  KL(q || p) + H(q)   (H(q) is a constant).
    logits (B, T, V), target (B, T). Returns (smoothed loss sum, plain NLL sum, number of target tokens);
    the caller divides by the token count of the whole (accumulated, all-rank) batch.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    keep = target != pad_id
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T)
    uniform = -logp.mean(dim=-1)  # (B, T): -(1/V) sum_k log p_k
    smoothed = (1.0 - epsilon) * nll + epsilon * uniform
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    return torch.where(keep, smoothed, zero).sum(), torch.where(keep, nll, zero).sum(), keep.sum()
