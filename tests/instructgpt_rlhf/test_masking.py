"""Batch layout and masking: prompt and padding never enter the SFT/DPO/PPO losses, EOS does; left padding and the
pad id change nothing; left-padded generation equals unpadded generation."""

import torch
from torch.testing import assert_close

from instructgpt_rlhf.data import collate, make_prompts, sft_examples, strip_after_eos
from instructgpt_rlhf.dpo import pair_logprobs
from instructgpt_rlhf.losses import dpo_loss, ppo_policy_loss, sft_loss, token_logprobs
from instructgpt_rlhf.model import ScalarHeadModel, policy_logits, policy_values
from x_llama import generate

from .conftest import tiny_llama

EOS = 2
PROMPTS = [[1, 10, 11], [1, 12], [1, 13, 14, 15, 16]]
COMPLETIONS = [[20, 21, EOS], [22, EOS], [23, 24, 25, 26, EOS]]


def direct_logprob(model, prompt, completion):
    """log p(completion | prompt) from one unpadded forward pass, summed by hand."""
    seq = torch.tensor([prompt + completion])
    logp = torch.log_softmax(model(seq).detach().float(), -1)[0]
    return sum(float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(completion))


def test_collate_layout():
    b = collate(PROMPTS, COMPLETIONS, pad_id=0)
    assert b.prompt_len == 5 and b.tokens.shape == (3, 10)
    assert b.tokens[1].tolist() == [0, 0, 0, 1, 12, 22, EOS, 0, 0, 0]
    assert b.completion_mask[1].tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    assert b.attention_mask[1].tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    assert b.positions[1, 3:7].tolist() == [0, 1, 2, 3]


def test_sequence_logprobs_equal_unpadded_and_ignore_pad_id():
    model = tiny_llama(64).eval()
    with torch.no_grad():
        for pad_id in (0, 5):
            b = collate(PROMPTS, COMPLETIONS, pad_id=pad_id)
            lp = token_logprobs(policy_logits(model, b), b.completion_labels)
            seq = (lp * b.label_mask).sum(-1)
            expected = torch.tensor([direct_logprob(model, p, c) for p, c in zip(PROMPTS, COMPLETIONS)])
            assert_close(seq, expected, atol=2e-5, rtol=0)


def test_sft_loss_counts_completion_and_eos_only():
    model = tiny_llama(64).eval()
    b = collate(PROMPTS, COMPLETIONS)
    logits = policy_logits(model, b)
    logits.retain_grad()
    loss = sft_loss(logits, b.completion_labels, b.label_mask)
    loss.backward()
    n = sum(len(c) for c in COMPLETIONS)
    expected = -sum(direct_logprob(model, p, c) for p, c in zip(PROMPTS, COMPLETIONS)) / n
    assert_close(loss, torch.tensor(expected), atol=2e-5, rtol=0)
    grad_rows = logits.grad.abs().sum(-1)  # (B, C)
    assert bool((grad_rows[b.label_mask == 0] == 0).all())  # padding rows: no gradient
    assert bool((grad_rows[b.label_mask == 1] > 0).all())  # every completion token, EOS included
    eos_positions = b.completion_labels == EOS
    assert bool((grad_rows[eos_positions] > 0).all())
    # the prompt is never a label: changing it changes logits only through the context, and the full-sequence
    # logits at prompt positions receive no gradient
    full = model(b.tokens[:, :-1], attention_mask=b.attention_mask[:, :-1])
    full.retain_grad()
    sft_loss(full[:, b.prompt_len - 1 :], b.completion_labels, b.label_mask).backward()
    assert float(full.grad[:, : b.prompt_len - 1].abs().sum()) == 0.0


def test_sft_examples_keep_eos_and_mask_prompt():
    ids = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [5, 6, 7]]
    examples = sft_examples(ids, bos_id=1, eos_id=EOS, max_len=64, seed=0)
    for (prompt, completion), full in zip(examples, ids):
        assert prompt[0] == 1 and 2 <= len(prompt) - 1 <= 8
        assert prompt[1:] + completion[:-1] == full and completion[-1] == EOS
    prompts = make_prompts([list(range(3, 40))] * 200, bos_id=1, seed=0)
    assert {len(p) - 1 for p in prompts} == set(range(2, 9))


def test_dpo_and_ppo_losses_ignore_padding_rows():
    model = tiny_llama(64)
    pairs = [(PROMPTS[0], COMPLETIONS[0], COMPLETIONS[1]), (PROMPTS[2], COMPLETIONS[2], COMPLETIONS[0])]
    pc, pr = pair_logprobs(model, pairs)
    expected = torch.tensor([direct_logprob(model, p, c) for p, c, _ in pairs] + [direct_logprob(model, p, r) for p, _, r in pairs])
    assert_close(torch.cat([pc, pr]).detach(), expected, atol=2e-5, rtol=0)
    loss, _, _ = dpo_loss(pc, pr, pc.detach() - 0.3, pr.detach() + 0.2, beta=0.1)
    assert torch.isfinite(loss)
    # PPO: a masked position with a huge advantage and a wild log-prob changes nothing
    b = collate(PROMPTS, COMPLETIONS)
    lp = token_logprobs(policy_logits(model, b), b.completion_labels).detach()
    adv = torch.randn(lp.shape)
    base, _ = ppo_policy_loss(lp + 0.1, lp, adv, b.label_mask)
    adv2, lp2 = adv.clone(), lp.clone()
    adv2[b.label_mask == 0] = 1e6
    lp2[b.label_mask == 0] = -50
    other, _ = ppo_policy_loss(lp2 + 0.1, lp2, adv2, b.label_mask)
    assert_close(base, other)


def test_reward_and_value_read_the_right_positions():
    model = tiny_llama(64)
    rm = ScalarHeadModel.from_policy(model).eval()
    b = collate(PROMPTS, COMPLETIONS)
    with torch.no_grad():
        scores = rm.score(b.tokens, b.attention_mask)
        for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
            alone = rm(torch.tensor([p + c]))[0, -1]  # the last real token (the EOS)
            assert_close(scores[i], alone, atol=2e-5, rtol=0)
        values = policy_values(rm, b)
        p, c = PROMPTS[1], COMPLETIONS[1]
        alone = rm(torch.tensor([p + c]))[0]
        assert_close(values[1, : len(c)], alone[len(p) - 1 : len(p) - 1 + len(c)], atol=2e-5, rtol=0)


def test_left_padded_generation_equals_unpadded():
    model = tiny_llama(64, seed=3).eval()
    batch = generate(model, PROMPTS, max_new_tokens=8, temperature=0.0, eos_id=EOS)
    for prompt, got in zip(PROMPTS, batch):
        alone = generate(model, [prompt], max_new_tokens=8, temperature=0.0, eos_id=EOS)[0]
        assert got == alone
        assert strip_after_eos(got, EOS) == got


def test_loss_uses_the_rollout_temperature():
    """The log-probs PPO's loss re-evaluates equal the ones the sampler drew from (same temperature)."""
    from instructgpt_rlhf.rollout import per_token_logprobs
    from x_llama import generate as x_generate

    model = tiny_llama(64, seed=4).eval()
    torch.manual_seed(0)
    out = x_generate(model, PROMPTS, max_new_tokens=6, temperature=0.7, eos_id=EOS, return_logprobs=True)
    b = collate(PROMPTS, out.tokens)
    with torch.no_grad():
        lp, _ = per_token_logprobs(model, b, temperature=0.7)
    for i, row in enumerate(out.logprobs):
        assert_close(lp[i, : len(row)], torch.tensor(row), atol=2e-5, rtol=0)


def test_parameter_counts():
    """The reward/value model is the policy plus a (dim + 1)-parameter head; the CPU-run policy size."""
    from x_llama import Llama, LlamaConfig

    config = LlamaConfig.from_preset("cpu", dim=192, n_layers=4, n_heads=6, n_kv_heads=2, vocab_size=2048)  # x_llama "demo"
    policy = Llama(config)
    assert sum(p.numel() for p in policy.parameters()) == config.num_parameters() == 2_361_024
    rm = ScalarHeadModel(config)
    assert sum(p.numel() for p in rm.parameters()) == 2_361_024 + 192 + 1
