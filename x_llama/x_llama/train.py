"""Pretraining (Touvron et al. 2023, section 2.2): next-token cross-entropy on en-text with AdamW (0.9, 0.95),
weight decay 0.1 on matrices only, a cosine schedule with warm-up decaying to 10% of the peak and gradient clipping
1.0, through the one training loop (axon_shared.training: accumulation, bf16, checkpoints and exact resume, the time
budget, DDP and per-block FSDP under torchrun).

    run_dir = train(TrainConfig.from_preset("tiny", train={"out_dir": "runs/x_llama/tiny"}))
    model, tokenizer, config = load_pretrained(run_dir)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from axon_shared.checkpoint import CheckpointError, load_checkpoint, run_checkpoints
from axon_shared.schedules import CosineSchedule
from axon_shared.tokenizer import Tokenizer, load_tokenizer
from axon_shared.training import Trainer

from .config import LlamaConfig, TrainConfig
from .data import batch_at, build_tokenizer, step_seed, token_stream
from .generation import generate
from .model import Llama, lm_loss

POLICY_FILE = "policy.safetensors"  # instructgpt_rlhf's final model of a stage (sft, ppo, dpo)

SAMPLE_PROMPTS = ("In the beginning", "To be, or not to be", "It is a truth universally acknowledged", "And the LORD said")


def training_flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """6 N + 12 L T d (Kaplan et al. 2020; PaLM appendix B): N = parameters doing matmuls (all but the
    embedding table), the second term the attention scores and weighted sum, forward + backward. For the
    architecture variants N counts the *active* parameters (the experts a token is routed to); the attention term
    is not reduced for the tokens Mixture-of-Depths routes around its blocks."""
    if config.is_llama2:
        n_params = config.num_parameters()
    else:
        with torch.device("meta"):
            n_params = Llama(config).active_parameters()
    n_matmul = n_params - config.vocab_size * config.dim
    return 6 * n_matmul + 12 * config.n_layers * seq_len * config.dim


@torch.no_grad()
def evaluate_loss(model: Llama, stream: Tensor, batches: int, batch_size: int, seq_len: int, seed: int = 0) -> float:
    """Mean next-token loss over a fixed set of `batches` random windows (the same windows every call)."""
    was_training = model.training
    model.eval()
    device = model.tok_embeddings.weight.device
    total = 0.0
    for index in range(batches):
        inputs, targets = batch_at(stream, batch_size, seq_len, step_seed(seed, 0, index, 999))
        total += float(lm_loss(model(inputs.to(device)), targets.to(device)))
    model.train(was_training)
    return total / batches


def train(cfg: TrainConfig, initial_state: dict[str, Tensor] | None = None) -> Path:
    """Pretrain, resuming from the latest checkpoint in cfg.train.out_dir if there is one; return the run dir.
    `initial_state`: weights to start from instead of the initialisation (GQA uptraining, x_llama.gqa); the run then
    evaluates before its first step too. A checkpoint in out_dir takes precedence (resume)."""
    opt, seq_len = cfg.train, cfg.data.seq_len
    with Trainer(opt, cfg, name="x_llama") as trainer:
        out_dir, rank = trainer.out_dir, trainer.ctx.rank
        with trainer.main_first():  # rank 0 trains the tokenizer and writes the token caches; the others read them
            tokenizer = build_tokenizer(cfg.data, cfg.model.vocab_size, out_dir)
            train_stream = token_stream(cfg.data, tokenizer, "train", out_dir)
            valid_stream = token_stream(cfg.data, tokenizer, "valid", out_dir)
        model = Llama(cfg.model)
        if initial_state is not None:
            model.load_state_dict(initial_state)
        model.activation_checkpointing = opt.activation_checkpointing

        def batch(step: int, micro: int) -> tuple[Tensor, Tensor]:
            """Random windows of the stream seeded by (seed, rank, step, micro): step + 1 counts steps from 1."""
            inputs, targets = batch_at(train_stream, opt.batch_size, seq_len, step_seed(opt.seed, rank, step + 1, micro))
            return inputs.to(trainer.device), targets.to(trainer.device)

        def loss(wrapped: torch.nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict]:
            inputs, targets = batch
            next_token = lm_loss(wrapped(inputs), targets)
            auxiliary = model.auxiliary_loss()  # the variants' router losses (MoE, Mixture-of-Depths), else None
            if auxiliary is None:
                return next_token, {}
            return next_token + auxiliary, {"lm_loss": next_token.detach(), "aux_loss": auxiliary.detach()}

        def evaluate(model: Llama, step: int) -> dict[str, float]:
            valid = evaluate_loss(model, valid_stream, opt.eval_batches, opt.batch_size, seq_len)
            return {"loss": valid, "ppl": math.exp(min(valid, 50))}

        trainer.fit(
            model,
            loss=loss,
            batch=batch,
            evaluate=evaluate,
            evaluate_first=initial_state is not None,
            schedule=CosineSchedule(opt.lr, opt.warmup_steps, opt.steps, opt.min_lr_ratio),
            count=lambda b: b[0].numel(),
            unit="tokens",
            blocks=model.layers,
            extra={"tokenizer": "tokenizer.model"},
            plots={"loss.png": ("train/loss", "valid/ppl"), "throughput.png": ("lr", "tokens_per_s", "grad_norm")},
        )
        if trainer.trained_steps and trainer.is_main:
            sampler = model
            if opt.fsdp and trainer.ctx.is_distributed:  # the shards live on every rank: sample from the saved whole model
                sampler, _, _ = load_pretrained(out_dir)
            _write_samples(sampler, tokenizer, out_dir)
    return out_dir


def _write_samples(model: Llama, tokenizer: Tokenizer, out_dir: Path, max_new_tokens: int = 48) -> None:
    generator = torch.Generator().manual_seed(0)
    lines = []
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(prompt, bos=True)
        budget = min(max_new_tokens, model.config.max_seq_len - len(ids))
        new = generate(model, [ids], budget, temperature=0.8, top_k=50, eos_id=tokenizer.eos_id, generator=generator)[0]
        prefix = tokenizer.decode(ids)
        lines.append(f"**{prefix}**{tokenizer.decode(ids + new)[len(prefix) :]}")
    (out_dir / "samples.md").write_text("\n\n".join(lines) + "\n")


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> tuple[Llama, Tokenizer | None, LlamaConfig]:
    """(model in eval mode, tokenizer or None, model config) from a run directory (its latest checkpoint) or a
    checkpoint file. Only the checkpoint's `model` section is read, so runs of other packages whose model is a
    Llama load too: an instructgpt_rlhf stage directory (sft, ppo, dpo) gives its final `policy.safetensors`,
    not the stage's training state. A reward or value model (a scalar head, not a language model) is refused."""
    path = Path(path)
    if path.is_dir():  # a stage's final model wins over its training state; a reward stage is refused below
        path = next((path / name for name in (POLICY_FILE, "reward.safetensors") if (path / name).is_file()), path)
    run_dir, (path,) = run_checkpoints(path)
    checkpoint = load_checkpoint(path)
    kind = checkpoint.config.get("kind")
    if kind in ("reward", "value"):
        raise CheckpointError(
            f"{path} is instructgpt_rlhf's {kind} model (a scalar head that scores text, not a language model); "
            "pass a policy: the run directory of an sft, ppo or dpo stage"
        )
    model_config = checkpoint.model_config(LlamaConfig)
    model = Llama(model_config)
    checkpoint.restore(model, rng=False)
    model.to(device).eval()
    tokenizer_file = run_dir / checkpoint.extra.get("tokenizer", "tokenizer.model")
    configured = (checkpoint.config.get("data") or {}).get("tokenizer")
    if configured and not tokenizer_file.is_file():
        tokenizer_file = Path(configured)
    tokenizer = load_tokenizer(tokenizer_file) if tokenizer_file.is_file() else None
    return model, tokenizer, model_config


def evaluate_command(cfg) -> dict[str, float]:
    """`x-llama evaluate`: perplexity exp(mean NLL) of a checkpoint on a split of en-text (fixed random windows)."""
    from axon_shared.config import ConfigError

    from .config import DataConfig

    model, tokenizer, _ = load_pretrained(cfg.checkpoint)
    if tokenizer is None:
        raise ConfigError(f"EvaluateConfig.checkpoint={cfg.checkpoint!r}: no tokenizer.model next to it, so the text cannot be encoded")
    run_dir, (path,) = run_checkpoints(cfg.checkpoint)
    data = DataConfig.from_saved(load_checkpoint(path).config.get("data", {}))
    stream = token_stream(data, tokenizer, cfg.split, run_dir)
    loss = evaluate_loss(model, stream, cfg.batches, cfg.batch_size, data.seq_len, seed=cfg.seed)
    result = {"split": cfg.split, "loss": loss, "perplexity": math.exp(loss), "tokens": cfg.batches * cfg.batch_size * data.seq_len}
    print(f"{cfg.split}: loss {loss:.4f}  perplexity {math.exp(loss):.2f}  ({result['tokens']} tokens)")
    return result
