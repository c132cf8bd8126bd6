"""Stage 3, PPO (Schulman et al. 2017) on the RLHF objective (InstructGPT section 3.5, eq. 2):

    max_pi  E_{x, y~pi} [ r(x, y) - beta log(pi(y|x) / ref(y|x)) ]  +  gamma_ptx E_{x~D_pretrain} [ log pi(x) ]

One iteration: sample a completion per prompt at temperature T (rollout), score it with the RM (minus a penalty if
it never emitted EOS), shape per-token rewards r_t = -beta (log pi - log ref)_t (+ score at the last token), run
GAE(gamma, lambda) with the value model (initialised from the RM), whiten the advantages, then `ppo_epochs` passes
of minibatch updates on the clipped surrogate + clipped value loss (+ gamma_ptx * pretraining LM loss). The same
temperature divides the logits in the rollout and in the loss. beta is fixed or follows the adaptive controller.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from axon_shared.seed import seed_everything
from axon_shared.training import Trainer, bf16_autocast

from .config import PPOConfig
from .data import Batch, collate, split_prompts
from .evaluate import measure
from .labeler import VaderLabeler
from .losses import AdaptiveKLController, gae, kl_shaped_rewards, masked_mean, masked_whiten, ppo_policy_loss, ppo_value_loss, token_entropy
from .model import already_trained, load_policy, load_scalar_model, policy_values, save_model, tokenizer_of
from .rollout import decode_texts, per_token_logprobs, sample_completions


def pretraining_tokens(tokenizer, max_chars: int = 2_000_000) -> torch.Tensor:
    """PPO-ptx data: en-text (the pretraining corpus) as one long stream of token ids."""
    from axon_shared.data import load_split

    texts, total = [], 0
    for record in load_split("en-text", "train"):
        texts.append(record["text"])
        total += len(record["text"])
        if total >= max_chars:
            break
    ids = [t for text in texts for t in tokenizer.encode(text, bos=True)]
    return torch.tensor(ids, dtype=torch.long)


def ptx_loss(policy, stream: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
    """Pretraining LM loss on random windows (global RNG) of the pretraining stream."""
    from x_llama import lm_loss

    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,))
    windows = torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])
    return lm_loss(policy(windows[:, :-1]), windows[:, 1:])


def sub_batch(batch: Batch, rows: torch.Tensor) -> Batch:
    return Batch(batch.tokens[rows], batch.attention_mask[rows], batch.completion_mask[rows], batch.prompt_len)


def ppo_iteration(
    policy,
    ref,
    value,
    prompts,
    score_fn,
    cfg: PPOConfig,
    update: Callable[[torch.Tensor], float],
    kl_ctl: AdaptiveKLController,
    eos_id: int,
    ptx_fn=None,
    bf16: bool = False,
):
    """One PPO iteration: rollout -> rewards -> GAE -> `ppo_epochs` passes of minibatch updates.
    score_fn(batch, completions) -> (B,) sequence scores (the RM; any function in tests); update(loss) does one
    optimizer update (backward, clip, step: the training loop's `Trainer.update`). Returns (metrics, completions).

    bf16 (`train.bf16`): the forward passes after the rollout run under bf16 autocast, the old, reference and
    updated log-probs alike (so the probability ratio starts at 1 up to the rounding of different batch shapes);
    the sampling itself and every loss stay float32."""
    s, T, mb = cfg.sampling, cfg.sampling.temperature, cfg.minibatch_size
    device = next(policy.parameters()).device
    # ---- rollout --------------------------------------------------------------------------------------------
    policy.eval()
    value.eval()
    completions = sample_completions(policy, prompts, s, eos_id)
    batch = collate(prompts, completions)
    B = len(prompts)
    mask = batch.label_mask.float()
    with torch.no_grad():
        with bf16_autocast(device, bf16):
            old_logprobs, logits = per_token_logprobs(policy, batch, T)
            ref_logprobs, _ = per_token_logprobs(ref, batch, T)
            old_values = policy_values(value, batch)
        old_values = old_values.float()
        entropy = masked_mean(token_entropy(logits, T), mask)
        has_eos = torch.tensor([len(c) > 0 and c[-1] == eos_id for c in completions])
        raw_score = score_fn(batch, completions).float()
        scores = raw_score - cfg.missing_eos_penalty * (~has_eos).float()
        rewards, kl = kl_shaped_rewards(scores, old_logprobs, ref_logprobs, mask, kl_ctl.value)
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
    # ---- PPO epochs over minibatches -----------------------------------------------------------------------
    policy.train()
    value.train()
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(cfg.ppo_epochs):
        for rows in torch.randperm(B).split(mb):
            sub = sub_batch(batch, rows)
            with bf16_autocast(device, bf16):
                logprobs, _ = per_token_logprobs(policy, sub, T)
                values = policy_values(value, sub)
            pg_loss, pg_stats = ppo_policy_loss(logprobs, old_logprobs[rows], advantages[rows], mask[rows], cfg.clip_range)
            values = values.float()
            vf_loss, vf_stats = ppo_value_loss(values, old_values[rows], returns[rows], mask[rows], cfg.clip_range_value)
            loss = pg_loss + cfg.vf_coef * vf_loss
            parts = {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(), **{k: float(v) for k, v in {**pg_stats, **vf_stats}.items()}}
            if ptx_fn is not None:  # PPO-ptx: + gamma_ptx * pretraining LM loss
                with bf16_autocast(device, bf16):
                    lm = ptx_fn()
                loss = loss + cfg.ptx_coef * lm
                parts["ptx_loss"] = lm.item()
            update(loss)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            updates += 1
    seq_kl = kl.sum(-1).mean().item()
    coef = kl_ctl.value
    kl_ctl.update(seq_kl, B)
    metrics = {
        "score": raw_score.mean().item(),
        "kl": seq_kl,
        "kl_coef": coef,
        "non_score_reward": float((-coef * kl).sum(-1).mean()),
        "entropy": entropy.item(),
        "length": float(mask.sum(-1).mean()),
        "eos_rate": float(has_eos.float().mean()),
        **{k: v / updates for k, v in sums.items()},
    }
    return metrics, completions


def run_ppo(cfg: PPOConfig) -> Path:
    tc = cfg.train
    out_dir = Path(tc.out_dir)
    final = out_dir / "policy.safetensors"
    if already_trained(final, "ppo"):
        return out_dir
    with Trainer(tc, cfg, name=f"ppo(kl={cfg.kl_coef})", frozen=("sft", "reward_model")) as trainer:
        tokenizer = tokenizer_of(cfg.sft)
        eos = tokenizer.eos_id
        policy = load_policy(cfg.sft)
        ref = load_policy(cfg.sft).eval().requires_grad_(False).to(trainer.device)
        rm = load_scalar_model(cfg.reward_model).eval().requires_grad_(False).to(trainer.device)
        value = load_scalar_model(cfg.reward_model)  # value function initialised from the RM
        s = cfg.sampling
        prompts = split_prompts(
            tokenizer, "train", cfg.num_prompts, seed=tc.seed + 7, min_tokens=s.min_prompt_tokens, max_tokens=s.max_prompt_tokens
        )
        eval_prompts = split_prompts(
            tokenizer, "valid", cfg.eval_prompts, seed=tc.seed, min_tokens=s.min_prompt_tokens, max_tokens=s.max_prompt_tokens
        )
        kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        stream = pretraining_tokens(tokenizer) if cfg.ptx_coef > 0 else None
        labeler = VaderLabeler()
        seed_everything(tc.seed)  # rollouts draw from the seed, whatever loading the four models drew

        def score_fn(batch, completions):
            return rm.score(batch.tokens, batch.attention_mask)

        def ptx_fn():
            return ptx_loss(policy, stream, cfg.ptx_batch_size, cfg.ptx_seq_len)

        def step(step_index: int) -> dict[str, float]:
            batch_prompts = [prompts[i] for i in trainer.batch_indices(len(prompts), step_index)]
            metrics, completions = ppo_iteration(
                policy,
                ref,
                value,
                batch_prompts,
                score_fn,
                cfg,
                trainer.update,
                kl_ctl,
                eos,
                ptx_fn=ptx_fn if stream is not None else None,
                bf16=tc.bf16,
            )
            truth = labeler(decode_texts(tokenizer, batch_prompts, completions))
            metrics["reward"] = float(sum(truth) / len(truth))  # ground truth (VADER), for the log only
            return metrics

        def evaluate(models, step_index: int) -> dict[str, float]:
            metrics, _ = measure(policy, ref, tokenizer, eval_prompts, s, labeler, seed=tc.seed)
            return metrics

        metrics = trainer.fit(
            nn.ModuleDict({"policy": policy, "value": value}),
            step=step,
            evaluate=evaluate,
            evaluate_first=True,
            schedule=tc.schedule(),
            state={"kl_controller": kl_ctl},
            count=tc.batch_size,
            unit="samples",
            plots={"ppo.png": ("train/score", "train/reward", "train/kl", "train/entropy", "valid/reward", "valid/kl")},
        )
        if trainer.is_main:
            save_model(
                final,
                policy,
                "policy",
                tokenizer.path,
                metrics=metrics,
                extra={"method": "ppo", "kl_coef": cfg.kl_coef, "ptx_coef": cfg.ptx_coef},
            )
    return out_dir
