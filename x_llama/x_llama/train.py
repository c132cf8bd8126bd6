"""Pretraining (Touvron et al. 2023, section 2.2): next-token cross-entropy on en-text, AdamW (0.9, 0.95),
weight decay 0.1 on matrices only, cosine schedule with warm-up to 10% of the peak, gradient clipping 1.0,
gradient accumulation, optional bf16 autocast and activation checkpointing, DDP/FSDP under torchrun, exact resume.

    run_dir = train(TrainConfig.from_preset("tiny", train={"out_dir": "runs/x_llama/tiny"}))
    model, tokenizer, config = load_pretrained(run_dir)
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch
from axon_shared.distributed import set_threads
from axon_shared.checkpoint import (
    CheckpointError, checkpoint_path, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint,
)
from axon_shared.distributed import all_reduce_mean, cleanup_distributed, setup_distributed, wrap_model
from axon_shared.metrics import MetricsLogger, plot_metrics
from axon_shared.progress import progress_bar
from axon_shared.schedules import CosineSchedule, set_lr
from axon_shared.seed import seed_everything
from axon_shared.tokenizer import Tokenizer, load_tokenizer
from torch import Tensor, nn

from .config import LlamaConfig, TrainConfig
from .data import batch_at, build_tokenizer, step_seed, token_stream
from .generation import generate
from .model import Llama, lm_loss

SAMPLE_PROMPTS = ("In the beginning", "To be, or not to be", "It is a truth universally acknowledged", "And the LORD said")



def training_flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """6 N + 12 L T d (Kaplan et al. 2020; PaLM appendix B): N = parameters doing matmuls (all but the
    embedding table), the second term the attention scores and weighted sum, forward + backward."""
    n_matmul = config.num_parameters() - config.vocab_size * config.dim
    return 6 * n_matmul + 12 * config.n_layers * seq_len * config.dim


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on >= 2-D parameters (matrices, embeddings) only, not on RMSNorm gains."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate_loss(model: Llama, stream: Tensor, batches: int, batch_size: int, seq_len: int, seed: int = 0, bf16: bool = False) -> float:
    """Mean next-token loss over a fixed set of `batches` random windows (the same windows every call)."""
    was_training = model.training
    model.eval()
    device = model.tok_embeddings.weight.device
    total = 0.0
    for index in range(batches):
        inputs, targets = batch_at(stream, batch_size, seq_len, step_seed(seed, 0, index, 999))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            total += float(lm_loss(model(inputs.to(device)), targets.to(device)))
    model.train(was_training)
    return total / batches


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def train(cfg: TrainConfig) -> Path:
    """Pretrain, resuming from the latest checkpoint in cfg.train.out_dir if there is one; return the run dir."""
    threads_before = torch.get_num_threads()
    set_threads(cfg.train.threads)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads_before)


def _train(cfg: TrainConfig) -> Path:
    opt = cfg.train
    out_dir = Path(opt.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    ctx = setup_distributed(opt.device)
    is_main = ctx.is_main
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(cfg.to_json())
        tokenizer = build_tokenizer(cfg.data, cfg.model.vocab_size, out_dir)
        train_stream = token_stream(cfg.data, tokenizer, "train", out_dir)
        valid_stream = token_stream(cfg.data, tokenizer, "valid", out_dir)
    if ctx.is_distributed:  # the main rank built tokenizer + caches; the others read them
        torch.distributed.barrier()
        if not is_main:
            tokenizer = build_tokenizer(cfg.data, cfg.model.vocab_size, out_dir)
            train_stream = token_stream(cfg.data, tokenizer, "train", out_dir)
            valid_stream = token_stream(cfg.data, tokenizer, "valid", out_dir)

    seed_everything(opt.seed)
    model = Llama(cfg.model).to(ctx.device)
    model.activation_checkpointing = opt.activation_checkpointing
    schedule = CosineSchedule(opt.lr, opt.warmup_steps, opt.total_steps or opt.max_steps, opt.min_lr_ratio)

    start_step, checkpoint = 0, None
    resume_from = latest_checkpoint(ckpt_dir)
    if resume_from is not None:
        checkpoint = load_checkpoint(resume_from, map_location=ctx.device)
        saved_model = checkpoint.config.get("model")
        if saved_model != cfg.model.to_dict():
            raise CheckpointError(
                f"{resume_from}: saved with a different model config ({saved_model}) than requested ({cfg.model.to_dict()}); "
                "use another --train.out_dir or the same model flags"
            )
        start_step = checkpoint.restore(model)  # parameters + RNG states
    sharded = opt.fsdp and ctx.is_distributed
    wrapped = wrap_model(model, ctx, fsdp=opt.fsdp)
    # the optimizer is built after wrapping: FSDP2 replaces the parameters with sharded ones
    optimizer = torch.optim.AdamW(param_groups(model, opt.weight_decay), lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)
    if checkpoint is not None:
        if sharded:
            _load_sharded_optimizer(model, optimizer, checkpoint)
        else:
            checkpoint.restore(optimizer=optimizer, rng=False)

    logger = MetricsLogger(out_dir / "metrics.jsonl", enabled=is_main, resume_step=start_step if resume_from else None)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * opt.grad_accum * ctx.world_size
    flops_per_token = training_flops_per_token(cfg.model, cfg.data.seq_len)
    deadline = time.time() + 60 * opt.max_minutes if opt.max_minutes else math.inf

    def save(step: int, metrics: dict) -> None:
        model_state, optimizer_state = model, optimizer
        if sharded:  # gather full tensors (a collective: every rank takes part), then rank 0 writes
            model_state, optimizer_state = _gather_sharded(model, optimizer)
        if is_main:
            save_checkpoint(
                checkpoint_path(ckpt_dir, step), model=model_state, optimizer=optimizer_state, step=step, config=cfg.to_dict(),
                metrics=metrics, extra={"tokenizer": "tokenizer.model", "tokens_seen": step * tokens_per_step},
            )
            prune_checkpoints(ckpt_dir, opt.keep_checkpoints)

    bar = progress_bar(range(start_step, opt.max_steps), enabled=is_main and opt.progress, initial=start_step, total=opt.max_steps, desc="x_llama")
    model.train()
    step = start_step
    window_loss, window_steps, window_start = 0.0, 0, time.time()
    last_metrics: dict = {}
    for step in range(start_step + 1, opt.max_steps + 1):
        lr = schedule(step - 1)
        set_lr(optimizer, lr)
        for micro in range(opt.grad_accum):
            inputs, targets = batch_at(train_stream, cfg.data.batch_size, cfg.data.seq_len, step_seed(opt.seed, ctx.rank, step, micro))
            inputs, targets = inputs.to(ctx.device), targets.to(ctx.device)
            sync = contextlib.nullcontext() if micro == opt.grad_accum - 1 or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
            with sync:
                with _autocast(ctx.device, opt.bf16):
                    loss = lm_loss(wrapped(inputs), targets) / opt.grad_accum  # mean over the accumulated batch
                loss.backward()
            window_loss += float(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip) if opt.grad_clip > 0 else torch.tensor(0.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_steps += 1
        bar.update(1)

        out_of_time = time.time() >= deadline
        last = step == opt.max_steps or out_of_time
        if step % opt.log_every == 0 or last:
            elapsed = max(time.time() - window_start, 1e-9)
            tokens_per_s = window_steps * tokens_per_step / elapsed
            mfu = tokens_per_s * flops_per_token / (opt.peak_tflops * 1e12 * ctx.world_size)
            train_loss = float(all_reduce_mean(torch.tensor(window_loss / window_steps), ctx))
            last_metrics = dict(loss=train_loss, lr=lr, grad_norm=float(grad_norm), tokens_per_s=tokens_per_s, mfu=mfu, tokens=step * tokens_per_step)
            logger.log(step, **last_metrics)
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", mfu=f"{mfu:.1%}")
            window_loss, window_steps, window_start = 0.0, 0, time.time()
        if step % opt.eval_every == 0 or last:
            val_loss = evaluate_loss(model, valid_stream, opt.eval_batches, cfg.data.batch_size, cfg.data.seq_len, bf16=opt.bf16)
            last_metrics.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
            logger.log(step, val_loss=val_loss, val_ppl=last_metrics["val_ppl"])
            window_start = time.time()  # keep evaluation time out of tokens/s
        if step % opt.checkpoint_every == 0 or last:
            save(step, last_metrics)
        if out_of_time:
            break
    bar.close()

    if is_main and step > start_step:
        _plots(out_dir)
        sampler = model
        if sharded:  # the FSDP shards live on every rank: sample from the gathered checkpoint instead
            sampler = Llama(cfg.model)
            load_checkpoint(latest_checkpoint(ckpt_dir)).restore(sampler, rng=False)
        _write_samples(sampler, tokenizer, out_dir)
    cleanup_distributed()
    return out_dir


class _StateDict:
    """Something with .state_dict(), for saving gathered FSDP state through axon_shared.save_checkpoint."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order (the integer ids of a plain optimizer state dict)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _gather_sharded(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[_StateDict, _StateDict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    full = get_optimizer_state_dict(model, optimizer, options=options)  # keyed by parameter name; rank 0 only
    if "state" not in full:  # other ranks receive empty dicts (cpu_offload keeps the full copy on rank 0)
        return _StateDict({}), _StateDict({})
    names = _parameter_names(model, optimizer)
    index = {name: i for i, name in enumerate(names)}
    plain = {
        "state": {index[name]: value for name, value in full["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]],
    }
    return _StateDict(model_state), _StateDict(plain)


def _load_sharded_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint) -> None:
    from axon_shared.checkpoint import _unflatten_optimizer
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    plain = _unflatten_optimizer(checkpoint.tensors.get("optimizer", {}), checkpoint.state["optimizer"])
    names = _parameter_names(model, optimizer)
    full = {
        "state": {names[int(i)]: value for i, value in plain["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in plain["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def _plots(out_dir: Path) -> None:
    metrics = out_dir / "metrics.jsonl"
    plot_metrics(metrics, out_dir / "loss.png", ["loss", "val_ppl"], title="x_llama pretraining on en-text", log_y=["val_ppl"])
    plot_metrics(metrics, out_dir / "throughput.png", ["lr", "tokens_per_s", "mfu"])


def _write_samples(model: Llama, tokenizer: Tokenizer, out_dir: Path, max_new_tokens: int = 48) -> None:
    generator = torch.Generator().manual_seed(0)
    lines = []
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(prompt, bos=True)
        budget = min(max_new_tokens, model.config.max_seq_len - len(ids))
        new = generate(model, [ids], budget, temperature=0.8, top_k=50, eos_id=tokenizer.eos_id, generator=generator)[0]
        prefix = tokenizer.decode(ids)
        lines.append(f"**{prefix}**{tokenizer.decode(ids + new)[len(prefix):]}")
    (out_dir / "samples.md").write_text("\n\n".join(lines) + "\n")


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> tuple[Llama, Tokenizer | None, LlamaConfig]:
    """(model in eval mode, tokenizer or None, model config) from a run directory (latest checkpoint) or a
    checkpoint file inside <run>/checkpoints/."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: no checkpoints found (expected {path}/checkpoints/step_*.safetensors); train first")
        run_dir = path if (path / "checkpoints").is_dir() else path.parent
        path = found
    else:
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    checkpoint = load_checkpoint(path)
    config = TrainConfig.from_dict(checkpoint.config) if "model" in checkpoint.config else None
    model_config = config.model if config is not None else LlamaConfig.from_dict(checkpoint.config)
    model = Llama(model_config)
    checkpoint.restore(model, rng=False)
    model.to(device).eval()
    tokenizer_file = run_dir / checkpoint.extra.get("tokenizer", "tokenizer.model")
    if config is not None and config.data.tokenizer and not tokenizer_file.is_file():
        tokenizer_file = Path(config.data.tokenizer)
    tokenizer = load_tokenizer(tokenizer_file) if tokenizer_file.is_file() else None
    return model, tokenizer, model_config
