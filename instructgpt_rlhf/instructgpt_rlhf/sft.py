"""Stage 1, supervised fine-tuning (InstructGPT section 3.5 "SFT"): maximise log pi(y | x) of the demonstrations.

Demonstrations are the 10.6k human-rated movie-review snippets of vader-sentiment (train split). Each is split into a
prompt (bos + its first 2-8 tokens, masked from the loss) and a completion (the rest + EOS, EOS kept as a label so
the policy learns to stop)."""

from __future__ import annotations

from pathlib import Path

import torch

from axon_shared.training import Trainer

from .config import SFTConfig
from .data import Batch, collate, sft_examples, snippet_tokens
from .losses import sft_loss
from .model import already_trained, policy_logits, save_model


def load_base(pretrained: str):
    """(Llama, tokenizer) from an x_llama run dir / checkpoint."""
    from x_llama import load_pretrained

    model, tokenizer, _ = load_pretrained(pretrained)
    return model, tokenizer


def run_sft(cfg: SFTConfig) -> Path:
    tc = cfg.train
    final = Path(tc.out_dir) / "policy.safetensors"
    if already_trained(final, "sft"):
        return final.parent
    with Trainer(tc, cfg, name="sft", frozen=("pretrained",)) as trainer:
        model, tokenizer = load_base(cfg.pretrained)
        if cfg.max_len > model.config.max_seq_len:
            raise ValueError(f"SFTConfig.max_len={cfg.max_len} exceeds the model's max_seq_len={model.config.max_seq_len}")
        train_ids = [t for t in snippet_tokens(tokenizer, "train") if len(t) >= 2][: cfg.max_train]
        valid_ids = [t for t in snippet_tokens(tokenizer, "valid") if len(t) >= 2][: cfg.max_valid]
        train = sft_examples(train_ids, tokenizer.bos_id, tokenizer.eos_id, cfg.max_len, seed=tc.seed)
        valid = sft_examples(valid_ids, tokenizer.bos_id, tokenizer.eos_id, cfg.max_len, seed=tc.seed + 1)

        def batch(step: int, micro: int) -> Batch:
            chosen = [train[i] for i in trainer.batch_indices(len(train), step, micro)]
            return collate([p for p, _ in chosen], [c for _, c in chosen]).to(trainer.device)

        def loss(model, batch: Batch) -> tuple[torch.Tensor, dict]:
            return sft_loss(policy_logits(model, batch), batch.completion_labels, batch.label_mask), {}

        def evaluate(model, step: int) -> dict[str, float]:
            total, count = 0.0, 0
            for start in range(0, len(valid), 64):
                chunk = valid[start : start + 64]
                held_out = collate([p for p, _ in chunk], [c for _, c in chunk]).to(trainer.device)
                n = int(held_out.label_mask.sum())
                total += float(sft_loss(policy_logits(model, held_out), held_out.completion_labels, held_out.label_mask)) * n
                count += n
            return {"loss": total / max(count, 1)}

        metrics = trainer.fit(
            model,
            loss=loss,
            batch=batch,
            evaluate=evaluate,
            schedule=tc.schedule(),
            count=lambda b: int(b.attention_mask.sum()),
            unit="tokens",
        )
        if trainer.is_main:
            save_model(final, model, "policy", tokenizer.path, metrics=metrics)
    return final.parent
