"""`transformer train`: section 5 of the paper on an offline parallel corpus.

Adam(0.9, 0.98, 1e-9) with the Noam schedule (eq. 3), label smoothing 0.1, token-based length-bucketed
batches, gradient accumulation, DDP under torchrun, exact resume from the latest checkpoint in out_dir.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch
from axon_shared.distributed import set_threads
from axon_shared.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from axon_shared.distributed import DistContext, barrier, cleanup_distributed, setup_distributed, wrap_model
from axon_shared.metrics import MetricsLogger, plot_metrics
from axon_shared.progress import progress_bar
from axon_shared.schedules import NoamSchedule, set_lr
from axon_shared.seed import seed_everything
from torch import Tensor, nn

from .config import TrainConfig, TransformerConfig
from .data import Example, batch_stream, build_tokenizer, collate, encode_pairs, load_pairs, pad
from .decoding import greedy_decode
from .inference import TOKENIZER_FILE, bleu
from .loss import label_smoothed_loss
from .model import Transformer, count_parameters



@torch.no_grad()
def validate(model: Transformer, examples: list[Example], tokenizer, references: list[str], *, max_tokens: int,
             bleu_sentences: int, device: torch.device) -> dict[str, float]:
    """Validation loss (plain NLL and label-smoothed, per target token) on all examples, greedy BLEU on a sample."""
    was_training = model.training
    model.eval()
    cfg = model.config
    totals = torch.zeros(3, dtype=torch.float64)
    order = sorted(range(len(examples)), key=lambda i: examples[i].size)
    start = 0
    while start < len(order):
        rows = [order[start]]
        while start + len(rows) < len(order) and examples[order[start + len(rows)]].size * (len(rows) + 1) <= max_tokens:
            rows.append(order[start + len(rows)])
        start += len(rows)
        src, tgt_in, tgt_out = (t.to(device) for t in collate([examples[i] for i in rows], cfg))
        smoothed, nll, n = label_smoothed_loss(model(src, tgt_in), tgt_out, epsilon=cfg.label_smoothing, pad_id=cfg.pad_id)
        totals += torch.tensor([smoothed.item(), nll.item(), n.item()], dtype=torch.float64)
    out = {"valid_loss": totals[0].item() / totals[2].item(), "valid_nll": totals[1].item() / totals[2].item()}
    out["valid_ppl"] = math.exp(min(out["valid_nll"], 50))
    if bleu_sentences:
        sample = examples[:bleu_sentences]
        hyps: list[str] = []
        for i in range(0, len(sample), 64):
            src = pad([e.src for e in sample[i : i + 64]], cfg.pad_id).to(device)
            hyps += [tokenizer.decode(t) for t in greedy_decode(model, src)]
        out["valid_bleu"], _ = bleu(hyps, references[: len(sample)])
    model.train(was_training)
    return out


def accumulate_gradients(model: nn.Module, micro: list[tuple[Tensor, Tensor, Tensor]], mc: TransformerConfig,
                         ctx: DistContext, autocast=None) -> tuple[float, float, int]:
    """Backward over the micro-batches of one optimizer step so that the gradient is that of
    (sum of label-smoothed token losses over the whole step on all ranks) / (number of target tokens in it).
    Returns this rank's (smoothed loss sum, nll sum, target tokens)."""
    local_tokens = sum(int((tgt_out != mc.pad_id).sum()) for _, _, tgt_out in micro)
    global_tokens = torch.tensor(float(local_tokens))
    if ctx.is_distributed:
        torch.distributed.all_reduce(global_tokens)
    # DDP averages gradients over ranks, so scale by world_size to get the per-token mean of the global batch
    scale = ctx.world_size / global_tokens.item()
    loss_sum = nll_sum = 0.0
    for i, (src, tgt_in, tgt_out) in enumerate(micro):
        last = i == len(micro) - 1
        sync = model.no_sync() if (ctx.is_distributed and not last and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with sync:
            with autocast or contextlib.nullcontext():
                logits = model(src.to(ctx.device), tgt_in.to(ctx.device))
            smoothed, nll, _ = label_smoothed_loss(logits, tgt_out.to(ctx.device), epsilon=mc.label_smoothing, pad_id=mc.pad_id)
            (smoothed * scale).backward()
        loss_sum, nll_sum = loss_sum + smoothed.item(), nll_sum + nll.item()
    return loss_sum, nll_sum, local_tokens


def train(config: TrainConfig) -> dict[str, float]:
    """Train (or resume) the run in config.train.out_dir; returns the last validation metrics."""
    set_threads()
    tc, mc = config.train, config.model
    seed_everything(tc.seed)
    ctx = setup_distributed(tc.device)
    out_dir = Path(tc.out_dir)
    ckpt_dir = out_dir / "checkpoints"

    # ---- data ----------------------------------------------------------------------------------------------
    train_pairs = load_pairs(config.data, "train")
    valid_pairs = load_pairs(config.data, "valid")
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        build_tokenizer(train_pairs, out_dir / TOKENIZER_FILE, mc, config.data.spm_sample, tc.seed)
    barrier(ctx)
    tokenizer = build_tokenizer(train_pairs, out_dir / TOKENIZER_FILE, mc, config.data.spm_sample, tc.seed)
    train_examples = encode_pairs(tokenizer, train_pairs, mc.max_len)
    valid_examples = encode_pairs(tokenizer, valid_pairs, mc.max_len, drop_long=False)
    valid_refs = [t for _, t in valid_pairs]

    # ---- model, optimizer, resume ----------------------------------------------------------------------------
    model = Transformer(mc).to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0, betas=(tc.beta1, tc.beta2), eps=tc.adam_eps)
    schedule = NoamSchedule(mc.d_model, tc.warmup, tc.lr_factor)
    step, epoch, position, elapsed_before = 0, 0, 0, 0.0
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None:
        ckpt = load_checkpoint(latest, map_location=ctx.device)
        if ckpt.config.get("model") != mc.to_dict():
            raise ValueError(f"{latest} was trained with a different model config; use a new --train.out_dir")
        step = ckpt.restore(model, optimizer)
        epoch, position, elapsed_before = ckpt.extra["epoch"], ckpt.extra["position"], ckpt.extra.get("elapsed", 0.0)
    elif ctx.is_main:
        (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    ddp_model = wrap_model(model, ctx)
    logger = MetricsLogger(out_dir / "metrics.jsonl", enabled=ctx.is_main, resume_step=step if latest else None)
    if ctx.is_main:
        print(f"transformer: {count_parameters(model):,} parameters; {len(train_examples):,} training pairs "
              f"({len(train_pairs) - len(train_examples)} longer than max_len dropped); "
              f"{'resuming at step ' + str(step) if latest else 'new run'} in {out_dir}")

    stream = batch_stream(train_examples, config.data.max_tokens, tc.seed, epoch, position, rank=ctx.rank, world_size=ctx.world_size)
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if tc.bf16 else contextlib.nullcontext()
    start_time = time.time() - elapsed_before
    last_eval_time, metrics = time.time(), {}
    bar = progress_bar(total=tc.max_steps, initial=step, enabled=ctx.is_main, desc="train")
    window_tokens, window_start = 0, time.time()

    def save(final: bool = False) -> None:
        if ctx.is_main:
            save_checkpoint(checkpoint_path(ckpt_dir, step), model=model, step=step, config=config.to_dict(), optimizer=optimizer,
                            metrics=metrics, extra={"epoch": epoch, "position": position, "elapsed": time.time() - start_time})
            prune_checkpoints(ckpt_dir, tc.keep_last)

    def evaluate() -> None:
        nonlocal metrics, last_eval_time
        if ctx.is_main:
            metrics = validate(model, valid_examples, tokenizer, valid_refs, max_tokens=config.data.max_tokens * 2,
                               bleu_sentences=tc.eval_bleu_sentences, device=ctx.device)
            logger.log(step, **metrics)
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        barrier(ctx)
        last_eval_time = time.time()

    model.train()
    stopped_by_time = False
    while step < tc.max_steps:
        # one optimizer step = accum_steps micro-batches; the summed loss is divided by the step's token count
        micro = []
        for _ in range(tc.accum_steps):
            epoch, position, examples = next(stream)
            micro.append(collate(examples, mc))
        loss_sum, nll_sum, local_tokens = accumulate_gradients(ddp_model, micro, mc, ctx, autocast)
        if tc.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad)
        lr = schedule(step + 1)
        set_lr(optimizer, lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_tokens += local_tokens * ctx.world_size

        bar.update(1)
        if step % tc.log_every == 0 or step == 1:
            tokens_per_s = window_tokens / max(time.time() - window_start, 1e-9)
            row = {"train_loss": loss_sum / local_tokens, "train_nll": nll_sum / local_tokens, "lr": lr,
                   "tokens_per_s": tokens_per_s, "epoch": epoch}
            logger.log(step, **row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", ep=epoch)
            window_tokens, window_start = 0, time.time()
        out_of_time = tc.max_minutes > 0 and time.time() - start_time >= tc.max_minutes * 60
        if ctx.is_distributed:  # every rank stops at the same step
            flag = torch.tensor(float(out_of_time))
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        timed_eval = tc.eval_minutes > 0 and time.time() - last_eval_time >= tc.eval_minutes * 60
        if step % tc.eval_every == 0 or timed_eval or out_of_time or step == tc.max_steps:
            evaluate()
        if step % tc.save_every == 0 or out_of_time or step == tc.max_steps:
            save()
        if out_of_time:
            stopped_by_time = True
            break
    bar.close()
    if ctx.is_main:
        if not metrics:
            evaluate()
        plot_run(out_dir)
        print(f"done at step {step} ({'time budget' if stopped_by_time else 'max_steps'}); {json.dumps(metrics)}")
    cleanup_distributed()
    return metrics


def plot_run(out_dir: Path) -> None:
    """loss.png (train and valid loss against time) and bleu.png (valid BLEU against time)."""
    metrics = out_dir / "metrics.jsonl"
    try:
        plot_metrics(metrics, out_dir / "loss.png", ["train_nll", "valid_nll"], x="time", title="NLL per target token")
        plot_metrics(metrics, out_dir / "bleu.png", ["valid_bleu"], x="time", title="greedy BLEU, valid sample")
        plot_metrics(metrics, out_dir / "loss_steps.png", ["train_loss", "valid_loss", "lr"], x="step")
    except ValueError:
        pass
