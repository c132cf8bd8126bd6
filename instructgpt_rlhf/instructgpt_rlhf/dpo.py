"""Stage 3', DPO (Rafailov et al. 2023): fit the policy to the preference pairs directly, no reward model, no RL.

    L_DPO = -E log sigma( beta log pi(y_w|x)/ref(y_w|x) - beta log pi(y_l|x)/ref(y_l|x) )        (eq. 7)

The pairs are the reward stage's: completions sampled from the SFT model and labelled by the ground truth (every
untied pair of the K per prompt). ref = the SFT model, frozen: its log-probs are computed without gradients for each
training batch (a run visits only a fraction of the pairs) and once up front for the held-out pairs.
Log-probs are sums over completion tokens (prompt and padding masked, EOS kept) in fp32. IPO and conservative DPO
are `loss_type="ipo"` and `label_smoothing > 0`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from axon_shared.training import Trainer

from .config import DPOConfig, SamplingConfig
from .data import Batch, collate, split_prompts
from .evaluate import measure
from .labeler import VaderLabeler
from .losses import dpo_loss, sequence_logprobs
from .model import already_trained, load_policy, policy_logits, save_model, tokenizer_of
from .reward import read_jsonl
from .rollout import completion_logprobs


def preference_pairs(records: list[dict]) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) for every labelled pair of every record."""
    return [(r["prompt"], r["completions"][w], r["completions"][l]) for r in records for w, l in r["pairs"]]


def pair_batch(pairs) -> Batch:
    """The 2B sequences [chosen; rejected] of B pairs, collated for one forward."""
    prompts = [p for p, _, _ in pairs] * 2
    completions = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    return collate(prompts, completions)


def batch_logprobs(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(chosen|x), log pi(rejected|x)) of a `pair_batch`: tensors in, tensors out (it compiles to one graph)."""
    logps = sequence_logprobs(policy_logits(model, batch), batch.completion_labels, batch.label_mask)
    return logps.chunk(2)


def pair_logprobs(model, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(chosen|x), log pi(rejected|x)), one forward over the 2B sequences [chosen; rejected]."""
    return batch_logprobs(model, pair_batch(pairs))


def paths_of(preferences: str) -> tuple[Path, Path]:
    p = Path(preferences)
    if p.is_dir():
        return p / "preferences_train.jsonl", p / "preferences_valid.jsonl"
    return p, p.with_name(p.name.replace("train", "valid"))


def run_dpo(cfg: DPOConfig) -> Path:
    tc = cfg.train
    out_dir = Path(tc.out_dir)
    final = out_dir / "policy.safetensors"
    if already_trained(final, "dpo"):
        return out_dir
    with Trainer(tc, cfg, name=f"dpo(beta={cfg.beta})", frozen=("sft", "preferences")) as trainer:
        tokenizer = tokenizer_of(cfg.sft)
        policy = load_policy(cfg.sft)
        ref = load_policy(cfg.sft).eval().requires_grad_(False).to(trainer.device)
        train_path, valid_path = paths_of(cfg.preferences)
        train = preference_pairs(read_jsonl(train_path))
        if not train:
            raise ValueError(f"{train_path}: no untied preference pairs; sample more prompts or completions (reward.num_prompts, reward.k)")
        valid = preference_pairs(read_jsonl(valid_path)) if valid_path.exists() else []
        valid = (valid or train[:64])[: cfg.max_valid_pairs]  # no held-out pairs (toy runs): report on training pairs
        with torch.no_grad():  # the frozen reference on the held-out pairs: once, up front
            vref_c = completion_logprobs(ref, [p for p, _, _ in valid], [c for _, c, _ in valid])
            vref_r = completion_logprobs(ref, [p for p, _, _ in valid], [r for _, _, r in valid])
        reward_config = train_path.parent / "config.json"
        sampling = (
            SamplingConfig.from_dict(json.loads(reward_config.read_text())["sampling"]) if reward_config.exists() else SamplingConfig()
        )
        eval_prompts = split_prompts(
            tokenizer, "valid", cfg.eval_prompts, seed=tc.seed, min_tokens=sampling.min_prompt_tokens, max_tokens=sampling.max_prompt_tokens
        )
        labeler = VaderLabeler()

        def batch(step: int, micro: int) -> dict:
            """The step's pairs as tensors, with the frozen reference's log-probs (in float32, without gradients; a run
            visits only a fraction of the pairs, so they are computed per batch) and the completion lengths."""
            pairs = [train[i] for i in trainer.batch_indices(len(train), step, micro)]
            sequences = pair_batch(pairs).to(trainer.device)
            with torch.no_grad():
                reference = batch_logprobs(ref, sequences)
            lengths = tuple(torch.tensor([len(pair[which]) for pair in pairs], device=trainer.device) for which in (1, 2))
            return {"sequences": sequences, "reference": reference, "lengths": lengths}

        def loss(policy, batch: dict) -> tuple[torch.Tensor, dict]:
            pc, pr = batch_logprobs(policy, batch["sequences"])
            value, cr, rr = dpo_loss(
                pc,
                pr,
                *batch["reference"],
                cfg.beta,
                loss_type=cfg.loss_type,
                label_smoothing=cfg.label_smoothing,
                chosen_lengths=batch["lengths"][0],
                rejected_lengths=batch["lengths"][1],
            )
            return value, {
                "margin": (cr - rr).mean().detach(),
                "accuracy": (cr > rr).float().mean(),
                "chosen_reward": cr.mean().detach(),
                "rejected_reward": rr.mean().detach(),
            }

        def evaluate(policy, step: int) -> dict[str, float]:
            margins = []
            for start in range(0, len(valid), 32):
                pc, pr = pair_logprobs(policy, valid[start : start + 32])
                margins.append(cfg.beta * ((pc - vref_c[start : start + 32]) - (pr - vref_r[start : start + 32])))
            margin = torch.cat(margins)
            metrics, _ = measure(policy, ref, tokenizer, eval_prompts, sampling, labeler, seed=tc.seed)
            return {"margin": float(margin.mean()), "accuracy": float((margin > 0).float().mean()), **metrics}

        metrics = trainer.fit(
            policy,
            loss=loss,
            batch=batch,
            evaluate=evaluate,
            evaluate_first=True,
            schedule=tc.schedule(),
            count=lambda batch: len(batch["lengths"][0]),
            unit="samples",
            plots={"loss.png": ("train/loss", "train/margin", "valid/accuracy", "valid/reward", "valid/kl")},
        )
        if trainer.is_main:
            save_model(
                final,
                policy,
                "policy",
                tokenizer.path,
                metrics=metrics,
                extra={"method": "dpo", "beta": cfg.beta, "loss_type": cfg.loss_type},
            )
    return out_dir
