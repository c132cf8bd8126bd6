"""Stage 1, supervised fine-tuning (InstructGPT section 3.5 "SFT"): maximise log pi(y | x) of the demonstrations.

Demonstrations are the 10.6k human-rated movie-review snippets of vader-sentiment (train split). Each is split into a
prompt (bos + its first 2-8 tokens, masked from the loss) and a completion (the rest + EOS, EOS kept as a label so
the policy learns to stop)."""

from __future__ import annotations

from pathlib import Path

import torch
from axon_shared.seed import seed_everything

from .config import SFTConfig
from .data import batch_indices, collate, sft_examples, snippet_tokens
from .loop import make_optimizer, set_threads, train_loop
from .losses import sft_loss
from .model import policy_logits, save_model


def load_base(pretrained: str):
    """(Llama, tokenizer) from an x_llama run dir / checkpoint."""
    from x_llama import load_pretrained

    model, tokenizer, _ = load_pretrained(pretrained)
    return model, tokenizer


def run_sft(cfg: SFTConfig) -> Path:
    set_threads()
    seed_everything(cfg.optim.seed)
    out_dir = Path(cfg.out_dir)
    final = out_dir / "policy.safetensors"
    if final.exists():
        print(f"sft: {final} exists, skipping (delete it to retrain)")
        return out_dir
    model, tokenizer = load_base(cfg.pretrained)
    if cfg.max_len > model.config.max_seq_len:
        raise ValueError(f"SFTConfig.max_len={cfg.max_len} exceeds the model's max_seq_len={model.config.max_seq_len}")
    s = cfg.sampling
    train_ids = [t for t in snippet_tokens(tokenizer, "train") if len(t) >= 2][: cfg.max_train]
    valid_ids = [t for t in snippet_tokens(tokenizer, "valid") if len(t) >= 2][: cfg.max_valid]
    train = sft_examples(train_ids, tokenizer.bos_id, tokenizer.eos_id, cfg.max_len, seed=cfg.optim.seed)
    valid = sft_examples(valid_ids, tokenizer.bos_id, tokenizer.eos_id, cfg.max_len, seed=cfg.optim.seed + 1)
    optimizer = make_optimizer(model.parameters(), cfg.optim)
    bs = cfg.optim.batch_size

    def step_fn(step: int) -> dict:
        idx = batch_indices(len(train), bs, step, cfg.optim.seed)
        batch = collate([train[i][0] for i in idx], [train[i][1] for i in idx])
        loss = sft_loss(policy_logits(model, batch), batch.completion_labels, batch.label_mask)
        loss.backward()
        return {"loss": loss.item(), "tokens": int(batch.attention_mask.sum())}

    @torch.no_grad()
    def eval_fn(step: int) -> dict:
        total, count = 0.0, 0
        for start in range(0, len(valid), 64):
            chunk = valid[start : start + 64]
            batch = collate([p for p, _ in chunk], [c for _, c in chunk])
            n = int(batch.label_mask.sum())
            total += float(sft_loss(policy_logits(model, batch), batch.completion_labels, batch.label_mask)) * n
            count += n
        return {"valid_loss": total / max(count, 1)}

    metrics = train_loop(name="sft", out_dir=out_dir, config=cfg.to_dict(), optim=cfg.optim, model=model, optimizer=optimizer, step_fn=step_fn, eval_fn=eval_fn)
    save_model(final, model, "policy", tokenizer.path, metrics=metrics)
    print(f"sft: wrote {final} ({metrics})")
    return out_dir
