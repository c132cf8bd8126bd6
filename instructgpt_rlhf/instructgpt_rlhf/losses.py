"""Every loss of the RLHF pipeline, as pure functions of tensors (no models inside).

Conventions: `logits[:, t]` predicts `labels[:, t]` (the caller shifts by one); masks are 1 on tokens that count
(completion tokens, EOS included) and 0 on prompt and padding tokens. Log-probabilities are computed in fp32.

- `sequence_logprobs`    log pi(y|x) = sum_t log pi(y_t | x, y_<t)                   (DPO paper eq. 7 inputs)
- `dpo_loss`             -log sigma(beta [(log pi_w - log ref_w) - (log pi_l - log ref_l)])   (DPO eq. 7),
                         the conservative (label-smoothed) variant, and IPO (Azar et al. 2023, eq. 17)
- `reward_model_loss`    -E log sigma(r(x, y_w) - r(x, y_l))                       (InstructGPT eq. 1)
- `soft_reward_model_loss` its soft-label form -E [q log sigma(r_1 - r_2) + (1-q) log sigma(r_2 - r_1)] (labeler pools)
- `kl_shaped_rewards`    r_t = -kl_coef (log pi - log ref)_t  (+ RM score at the last token)   (InstructGPT eq. 2)
- `gae`                  A_t = sum_l (gamma lam)^l delta_{t+l}                      (Schulman et al. 2016, eq. 16)
- `ppo_policy_loss`      -E min(rho A, clip(rho, 1-eps, 1+eps) A)                   (PPO paper eq. 7)
- `ppo_value_loss`       1/2 E max((V - R)^2, (clip(V, V_old +- eps) - R)^2)
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------- helpers


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over the positions where mask == 1 (over all of them, or along `dim`)."""
    keep = mask.bool()
    values = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
    count = keep.to(values.dtype)
    if dim is None:
        return values.sum() / count.sum().clamp(min=1.0)
    return values.sum(dim) / count.sum(dim).clamp(min=1.0)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions (unbiased variance); masked-out positions become 0."""
    mean = masked_mean(values, mask)
    centred = values - mean
    count = mask.sum().clamp(min=2.0)
    var = ((centred**2) * mask).sum() / (count - 1)
    whitened = centred * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[label] per position, in fp32. logits (B,T,V), labels (B,T) -> (B,T).

    Labels outside [0, V) (e.g. -100 for ignored positions) are read as token 0; mask them afterwards."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    safe = labels.clamp(min=0, max=logits.size(-1) - 1)
    picked = torch.gather(logits, -1, safe.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position, fp32. (B,T,V) -> (B,T)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """log pi(y | x) = sum over masked positions of log softmax(logits)[label], in fp32. -> (B,)

    logits (B,T,V) with logits[:, t] predicting labels[:, t]; loss_mask (B,T) 1 on completion tokens (EOS included),
    0 on prompt and padding, so the prompt and pads contribute nothing (whatever the pad id is)."""
    logps = token_logprobs(logits, labels)
    return torch.where(loss_mask.bool(), logps, torch.zeros((), device=logps.device)).sum(-1)


# ----------------------------------------------------------------------------------------------- DPO


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    *,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss (Rafailov et al. 2023, eq. 7) and its variants; returns (mean loss, chosen_rewards, rejected_rewards).

    h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))
    - "sigmoid": -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)   (eps = label_smoothing; eps = 0 is DPO,
      eps > 0 is conservative DPO: the label is flipped with probability eps)
    - "ipo":     (h - 1 / (2 beta))^2   (Azar et al. 2023, eq. 17; beta plays tau). If chosen_lengths and
      rejected_lengths are given, each log-ratio is divided by its completion length first (trl's convention).
    The implicit rewards beta * (log pi - log ref) are returned detached (DPO section 5).
    """
    chosen_logratios = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratios = policy_rejected_logps.float() - ref_rejected_logps.float()
    if loss_type == "sigmoid":
        h = chosen_logratios - rejected_logratios
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if chosen_lengths is not None and rejected_lengths is not None:
            h = chosen_logratios / chosen_lengths.clamp(min=1).float() - rejected_logratios / rejected_lengths.clamp(min=1).float()
        else:
            h = chosen_logratios - rejected_logratios
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; use 'sigmoid' (DPO, cDPO with label_smoothing) or 'ipo'")
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses.mean(), chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------------------------- reward model


def reward_model_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood -mean log sigma(r_w - r_l [- margin]) (InstructGPT eq. 1)."""
    delta = chosen_rewards.float() - rejected_rewards.float()
    if margin is not None:
        delta = delta - margin
    return -F.logsigmoid(delta).mean()


def soft_reward_model_loss(first_rewards: torch.Tensor, second_rewards: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry cross-entropy with soft labels q = P(first > second):
    -mean [ q log sigma(r_1 - r_2) + (1 - q) log sigma(r_2 - r_1) ]. With q = 1 it is `reward_model_loss`; q is the
    labeler pool's posterior (`labelers.em_posteriors`), so a pair the pool is unsure of pulls r_1 - r_2 towards
    logit q instead of to infinity."""
    delta = first_rewards.float() - second_rewards.float()
    q = targets.to(delta.dtype)
    return -(q * F.logsigmoid(delta) + (1 - q) * F.logsigmoid(-delta)).mean()


def ranked_pairs(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All C(K,2) pairs of each row's K ranked completions: (row, winner, loser) index tensors, ties dropped.

    scores (N,K): the labeller's score of each completion; the higher one wins. InstructGPT averages the loss over
    all C(K,2) pairs of a prompt, so `reward_model_loss` over these pairs is its eq. 1 (up to the dropped ties)."""
    rows, winners, losers = [], [], []
    for i, j in itertools.combinations(range(scores.size(1)), 2):
        a, b = scores[:, i], scores[:, j]
        keep = a != b
        idx = torch.nonzero(keep).squeeze(-1)
        rows.append(idx)
        winners.append(torch.where(a[idx] > b[idx], i, j))
        losers.append(torch.where(a[idx] > b[idx], j, i))
    return torch.cat(rows), torch.cat(winners), torch.cat(losers)


# ----------------------------------------------------------------------------------------------- PPO


def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -kl_coef * (log pi(y_t) - log ref(y_t)), plus the sequence score at the last
    completion token (the EOS when there is one). Returns (rewards, per-token kl), both (B,T) and 0 off the mask.

    Summed over t, this is the InstructGPT objective's r(x,y) - beta log(pi(y|x) / ref(y|x)) (eq. 2)."""
    mask = mask.float()
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.cumsum(-1) * mask).argmax(-1)  # index of the last 1 in each row
    rewards = rewards.clone()
    rewards[torch.arange(rewards.size(0)), last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016). Returns (advantages, returns), (B,T).

    delta_t = r_t + gamma V_{t+1} - V_t  (V after the last token is 0: the episode ends)
    A_t     = delta_t + gamma lam A_{t+1}   (a reverse scan, eq. 16)      returns R_t = A_t + V_t.
    `mask` marks the completion tokens (contiguous per row); positions off the mask are 0 and do not leak in."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    T = rewards.size(1)
    advantages = torch.zeros_like(values)
    next_adv = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        # off-mask positions pass the running values through unchanged (so trailing pads act like the episode end)
        advantages[:, t] = adv * mask[:, t]
        next_adv = torch.where(mask[:, t] > 0, adv, next_adv)
        next_value = torch.where(mask[:, t] > 0, values[:, t], next_value)
    returns = (advantages + values) * mask
    return advantages, returns


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7) as a loss to minimise, averaged over masked tokens:
    L = mean max(-A rho, -A clip(rho, 1 - eps, 1 + eps)),  rho = exp(log pi - log pi_old).
    Also returns the clip fraction and the approximate KL 1/2 E (log rho)^2 (no gradient)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 1/2 mean max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2) over masked tokens."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    err, err_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((err_clipped > err).float(), mask), "value_error": masked_mean(err, mask)}
    return loss, stats


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, section 2.2): beta <- beta (1 + K_beta e_t n / horizon),
    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2). With target=None the coefficient stays fixed."""

    def __init__(self, init_kl_coef: float, target: float | None = None, horizon: int = 10000):
        self.value = float(init_kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning: mean next-token NLL over the completion tokens (EOS included); the prompt and the
    padding are masked out. logits (B,C,V) predict labels (B,C)."""
    return -masked_mean(token_logprobs(logits, labels), loss_mask)
