"""instructgpt_rlhf.losses against hand-computed values and direct reference computations."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from instructgpt_rlhf import losses as L


def test_sequence_logprobs_matches_cross_entropy_and_ignores_masked_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 0]])
    ours = L.sequence_logprobs(logits, labels, mask)
    ignored = labels.masked_fill(mask == 0, -100)
    ref = -F.cross_entropy(logits.transpose(1, 2), ignored, ignore_index=-100, reduction="none").sum(-1)
    assert_close(ours, ref)
    # whatever sits at masked positions (labels or logits) changes nothing
    labels2 = torch.where(mask == 1, labels, torch.randint(0, 11, (3, 5), generator=g))
    logits2 = torch.where(mask.unsqueeze(-1) == 1, logits, 100 * torch.randn(3, 5, 11, generator=g))
    assert_close(L.sequence_logprobs(logits2, labels2, mask), ours)
    # fp32 even for bf16 logits
    assert L.sequence_logprobs(logits.bfloat16(), labels, mask).dtype == torch.float32


def test_dpo_loss_hand_values():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.5))
    loss, cr, rj = L.dpo_loss(pc, pr, rc, rr, beta=0.5)
    # h = (-1 + 1.5) - (-2 + 1.5) = 1;  -log sigma(0.5) = log(1 + e^-0.5)
    assert_close(loss, torch.tensor(math.log1p(math.exp(-0.5))))
    assert_close(cr, torch.tensor([0.25]))
    assert_close(rj, torch.tensor([-0.25]))
    loss_c, _, _ = L.dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert_close(loss_c, torch.tensor(0.9 * math.log1p(math.exp(-0.5)) + 0.1 * math.log1p(math.exp(0.5))))
    loss_ipo, _, _ = L.dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo")  # (1 - 1/(2*0.25))^2 = 1
    assert_close(loss_ipo, torch.tensor(1.0))
    loss_ipo_norm, _, _ = L.dpo_loss(
        pc, pr, rc, rr, beta=0.25, loss_type="ipo", chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([4])
    )
    assert_close(loss_ipo_norm, torch.tensor((0.5 / 2 + 0.5 / 4 - 2.0) ** 2))
    with pytest.raises(ValueError, match="unknown loss_type"):
        L.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="hinge2")


def test_dpo_gradient_direction():
    """The gradient raises log pi(chosen) and lowers log pi(rejected), weighted by sigma(-beta h) (DPO eq. 8)."""
    pc = torch.tensor([-3.0], requires_grad=True)
    pr = torch.tensor([-3.0], requires_grad=True)
    loss, _, _ = L.dpo_loss(pc, pr, torch.tensor([-3.0]), torch.tensor([-3.0]), beta=0.1)
    loss.backward()
    assert_close(pc.grad, torch.tensor([-0.1 * 0.5]))
    assert_close(pr.grad, torch.tensor([0.1 * 0.5]))


def test_reward_model_loss_and_all_pairs():
    c, r = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = (math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.exp(3))) / 3
    assert_close(L.reward_model_loss(c, r), torch.tensor(expected))
    assert_close(L.reward_model_loss(c, r, margin=torch.tensor([1.0, 0, 0])), torch.tensor((math.log(2) * 2 + math.log1p(math.exp(3))) / 3))
    scores = torch.tensor([[0.1, 0.5, -0.3, 0.9], [0.0, 0.0, 1.0, -1.0]])
    rows, w, l = L.ranked_pairs(scores)
    assert (rows == 0).sum() == 6 and (rows == 1).sum() == 5  # C(4,2) = 6, one tie dropped in row 1
    assert bool((scores[rows, w] > scores[rows, l]).all())


def _gae_reference(rewards, values, gamma, lam):
    """Textbook reverse loop on one unpadded episode (python floats)."""
    T = len(rewards)
    adv, last = [0.0] * T, 0.0
    for t in reversed(range(T)):
        next_v = values[t + 1] if t + 1 < T else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values)]


def test_gae_hand_values():
    adv, ret = L.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.4, 0.3]]), torch.ones(1, 3), gamma=1.0, lam=0.95)
    # delta = [-0.1, -0.1, 0.7]; A2 = 0.7, A1 = -0.1 + 0.95*0.7 = 0.565, A0 = -0.1 + 0.95*0.565 = 0.43675
    assert_close(adv, torch.tensor([[0.43675, 0.565, 0.7]]))
    assert_close(ret, torch.tensor([[0.93675, 0.965, 1.0]]))
    # lambda = 1, gamma = 1: returns are the (undiscounted) rewards-to-go, whatever the values
    _, ret1 = L.gae(torch.tensor([[0.2, -0.1, 1.0]]), torch.tensor([[3.0, -2.0, 7.0]]), torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert_close(ret1, torch.tensor([[1.1, 0.9, 1.0]]))


def test_gae_padded_batch_equals_per_episode_reverse_loop():
    g = torch.Generator().manual_seed(1)
    lengths = [5, 2, 7, 1]
    T = 9
    rewards, values = torch.randn(4, T, generator=g), torch.randn(4, T, generator=g)
    mask = torch.zeros(4, T)
    starts = [2, 2, 2, 2]  # completions start after a (left-padded) prompt region of 2
    for i, n in enumerate(lengths):
        mask[i, starts[i] : starts[i] + n] = 1
    adv, ret = L.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for i, n in enumerate(lengths):
        sl = slice(starts[i], starts[i] + n)
        a_ref, r_ref = _gae_reference(rewards[i, sl].tolist(), values[i, sl].tolist(), 0.9, 0.8)
        assert_close(adv[i, sl], torch.tensor(a_ref))
        assert_close(ret[i, sl], torch.tensor(r_ref))
        assert float(adv[i][mask[i] == 0].abs().sum()) == 0.0


def test_kl_shaped_rewards_hand_values():
    rewards, kl = L.kl_shaped_rewards(
        torch.tensor([2.0, -1.0]),
        torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-1.0, -1.0, 0.0, 0.0]]),
        torch.tensor([[-1.5, -2.0, -2.0, 0.0], [-2.0, -1.0, 5.0, 5.0]]),
        torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
        kl_coef=0.1,
    )
    assert_close(kl, torch.tensor([[0.5, 0.0, -1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert_close(rewards, torch.tensor([[-0.05, 0.0, 2.1, 0.0], [-0.1, -1.0, 0.0, 0.0]]))


def test_ppo_policy_loss_hand_values():
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.0, 9.0]]))
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = L.ppo_policy_loss(logprobs, torch.zeros(1, 4), adv, mask, clip_range=0.2)
    # token 0: max(-1.5, -1.2) = -1.2; token 1: max(0.5, 0.8) = 0.8; token 2: -2; token 3 masked
    assert_close(loss, torch.tensor(-0.8))
    assert_close(stats["clipfrac"], torch.tensor(2 / 3))
    assert_close(stats["approx_kl"], 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3 * torch.ones(()))


def test_ppo_value_loss_hand_values():
    loss, stats = L.ppo_value_loss(
        torch.tensor([[1.0, 0.0, 4.0]]), torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[1, 1, 0]]), 0.2
    )
    # token 0: max((1-2)^2, (0.7-2)^2) = 1.69; token 1: max(0, (0.3-0)^2) = 0.09
    assert_close(loss, torch.tensor(0.5 * (1.69 + 0.09) / 2))
    assert_close(stats["value_error"], torch.tensor(0.5))


def test_whiten_and_adaptive_kl():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g) * 3 + 2
    mask = (torch.rand(4, 6, generator=g) > 0.3).float()
    w = L.masked_whiten(x, mask)
    vals = w[mask == 1]
    assert_close(vals.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(vals.std(), torch.tensor(1.0), atol=1e-4, rtol=0)
    assert float(w[mask == 0].abs().sum()) == 0
    ctl = L.AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert_close(torch.tensor(ctl.update(12.0, 10)), torch.tensor(0.1 * (1 + 0.2 * 10 / 100)))  # error clipped at 0.2
    assert_close(torch.tensor(ctl.update(6.0, 10)), torch.tensor(0.1 * (1 + 0.2 * 10 / 100)))  # on target: unchanged
    fixed = L.AdaptiveKLController(0.05)
    assert fixed.update(100.0, 10) == 0.05


def test_token_logprobs_and_entropy_equal_torch_categorical():
    """log pi(label) and the entropy at temperatures below, at and above 1 equal torch.distributions.Categorical's;
    label 0 is a real token (only labels outside [0, V) are clamped)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 7, generator=g) * 2
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, 0], labels[1, 4] = 0, 6
    for temperature in (0.5, 1.0, 1.7, 2.0):
        dist = torch.distributions.Categorical(logits=logits / temperature)
        assert_close(L.token_logprobs(logits, labels, temperature), dist.log_prob(labels))
        assert_close(L.token_entropy(logits, temperature), dist.entropy())
    assert_close(L.token_entropy(logits), torch.distributions.Categorical(logits=logits).entropy())  # default: 1


def test_soft_reward_model_loss_is_binary_cross_entropy_on_the_reward_difference():
    """-[q log s(d) + (1 - q) log s(-d)] with d = r1 - r2 is torch's BCE-with-logits of d against target q; q = 1
    gives reward_model_loss; q = 1/2 is minimised at d = 0 (gradient 0 there)."""
    g = torch.Generator().manual_seed(4)
    r1, r2, q = torch.randn(8, generator=g), torch.randn(8, generator=g), torch.rand(8, generator=g)
    assert_close(L.soft_reward_model_loss(r1, r2, q), F.binary_cross_entropy_with_logits(r1 - r2, q))
    assert_close(L.soft_reward_model_loss(r1, r2, torch.ones(8)), L.reward_model_loss(r1, r2))
    d = torch.zeros(3, requires_grad=True)
    L.soft_reward_model_loss(d, torch.zeros(3), torch.full((3,), 0.5)).backward()
    assert float(d.grad.abs().max()) == 0.0


def test_gae_defaults_and_padding():
    """The defaults are InstructGPT's gamma = 1, lambda = 0.95; returns are 0 off the mask (not inf or nan)."""
    rewards, values = torch.tensor([[0.0, 0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.4, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = L.gae(rewards, values, mask)
    explicit_adv, explicit_ret = L.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert_close(adv, explicit_adv) and assert_close(ret, explicit_ret)
    assert_close(adv[0, :3], torch.tensor([0.43675, 0.565, 0.7]))
    assert torch.equal(ret[0, 3], torch.tensor(0.0)) and torch.equal(adv[0, 3], torch.tensor(0.0))


def test_masked_mean_whole_and_per_row_and_whiten_without_shift():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 5.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert_close(L.masked_mean(values, mask), torch.tensor(18.0 / 5))
    assert_close(L.masked_mean(values, mask, dim=1), torch.tensor([1.5, 5.0]))
    assert_close(L.masked_mean(values, torch.zeros(2, 3)), torch.tensor(0.0))  # empty mask: 0, not nan
    # per row: a row with one kept value is that value, an empty row is 0
    one_or_none = torch.tensor([[0, 1, 0], [0, 0, 0]])
    assert_close(L.masked_mean(values, one_or_none, dim=1), torch.tensor([2.0, 0.0]))
    # shift_mean=False: divided by the std, the mean put back (trl's `whiten(shift_mean=False)`)
    g = torch.Generator().manual_seed(5)
    x, m = torch.randn(3, 4, generator=g) * 2 + 3, (torch.rand(3, 4, generator=g) > 0.2).float()
    kept = x[m == 1]
    expected = ((x - kept.mean()) / kept.std() + kept.mean()) * m
    assert_close(L.masked_whiten(x, m, shift_mean=False), expected, atol=1e-5, rtol=1e-5)


def test_ipo_length_normalised_margin_hand_values_with_an_empty_completion():
    """IPO with lengths divides each log-ratio by its length; an empty completion (length 0) counts as length 1.
    h = [-2/4 - 0/1, -3/2 + 4/2] = [-0.5, 0.5]; loss = mean (h - 1/(2 * 0.1))^2 = (30.25 + 20.25) / 2."""
    zero = torch.zeros(2)
    loss, _, _ = L.dpo_loss(
        torch.tensor([-2.0, -3.0]), torch.tensor([0.0, -4.0]), zero, zero, beta=0.1, loss_type="ipo",
        chosen_lengths=torch.tensor([4, 2]), rejected_lengths=torch.tensor([0, 2]),
    )  # fmt: skip
    assert_close(loss, torch.tensor(25.25))


def test_value_clip_default_and_adaptive_kl_lower_clip():
    """The value clip defaults to 0.2 (the paper's eps); the adaptive KL error is clipped at -0.2 from below."""
    args = (torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[1, 1]]))
    assert_close(L.ppo_value_loss(*args)[0], L.ppo_value_loss(*args, 0.2)[0])
    assert_close(L.ppo_value_loss(*args)[0], torch.tensor(0.5 * (1.69 + 0.09) / 2))
    ctl = L.AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert_close(torch.tensor(ctl.update(0.0, 10)), torch.tensor(0.1 * (1 - 0.2 * 10 / 100)))


def test_ppo_clip_range_defaults_to_the_papers_0_2():
    """PPO's eps = 0.2 (Schulman et al. 2017, section 6.1) is the default: ratio 1.5 with A > 0 is clipped at 1.2."""
    logprobs, old = torch.log(torch.tensor([[1.5, 0.5]])), torch.zeros(1, 2)
    adv, mask = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    loss, stats = L.ppo_policy_loss(logprobs, old, adv, mask)
    assert_close(loss, torch.tensor((-1.2 + 0.8) / 2))
    assert_close(stats["clipfrac"], torch.tensor(1.0))


def test_labels_past_the_vocabulary_are_clamped_not_an_index_error():
    """Padding labels may be any id (-100, or V for a pad token past the vocabulary): they are clamped into [0, V)
    before the gather, and a masked position contributes nothing whatever its label."""
    g = torch.Generator().manual_seed(6)
    logits, labels = torch.randn(2, 4, 5, generator=g), torch.randint(0, 5, (2, 4), generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    padded = torch.where(mask == 1, labels, torch.tensor([[5], [-100]]))
    assert_close(L.sequence_logprobs(logits, padded, mask), L.sequence_logprobs(logits, labels, mask))
    assert_close(L.token_logprobs(logits, padded)[0, 2:], torch.log_softmax(logits, -1)[0, 2:, 4])  # clamped to V - 1


def test_gae_of_one_token_completions():
    """A completion of one token (T = 1): A = r - V, R = r, for gamma and lambda of any value."""
    rewards, values = torch.tensor([[0.7], [-0.2]]), torch.tensor([[0.3], [0.5]])
    adv, ret = L.gae(rewards, values, torch.ones(2, 1), gamma=0.9, lam=0.8)
    assert_close(adv, torch.tensor([[0.4], [-0.7]]))
    assert_close(ret, rewards)


def test_gae_passes_through_positions_off_the_mask():
    """Off-mask positions carry the running advantage and value through unchanged: a row with a hole in its mask
    gets the advantages of the row with the hole cut out (and 0 in the hole)."""
    g = torch.Generator().manual_seed(8)
    rewards, values = torch.randn(1, 6, generator=g), torch.randn(1, 6, generator=g)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0, 0.0]])
    adv, ret = L.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    kept = mask[0] == 1
    a_ref, r_ref = _gae_reference(rewards[0, kept].tolist(), values[0, kept].tolist(), 0.9, 0.8)
    assert_close(adv[0, kept], torch.tensor(a_ref))
    assert_close(ret[0, kept], torch.tensor(r_ref))
    assert float(adv[0, ~kept].abs().sum()) == 0.0
