"""`dali-ddpm train`: Algorithm 1 of Ho et al. (2020) with the paper's recipe (appendix B).

Adam, linear warm-up to a constant lr, gradient-norm clipping, EMA of the weights (samples come from the EMA
weights), optional random horizontal flips and bf16 autocast, DDP under torchrun, exact resume from the latest
checkpoint in out_dir (data order is a pure function of the step; RNG, optimizer and EMA are restored).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from axon_shared.distributed import set_threads
from axon_shared import (
    EMA,
    MetricsLogger,
    WarmupConstantSchedule,
    all_reduce_mean,
    checkpoint_path,
    cleanup_distributed,
    latest_checkpoint,
    load_checkpoint,
    plot_metrics,
    progress_bar,
    prune_checkpoints,
    save_checkpoint,
    seed_everything,
    set_lr,
    setup_distributed,
    wrap_model,
)

from .config import DDPMConfig
from .data import batch_indices, load_images, to_model_range
from .diffusion import GaussianDiffusion
from .model import UNet, count_parameters
from .viz import save_grid



def build(cfg: DDPMConfig, device: torch.device | str = "cpu") -> tuple[UNet, GaussianDiffusion]:
    return UNet(cfg.model).to(device), GaussianDiffusion.from_config(cfg.diffusion).to(device)


@torch.no_grad()
def sample_grid(model: UNet, diffusion: GaussianDiffusion, n: int, steps: int, seed: int, device) -> torch.Tensor:
    """DDIM samples from a fixed seed (its own generator: the training RNG stream is untouched)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (n, model.config.in_channels, model.config.image_size, model.config.image_size)
    x, _ = diffusion.ddim_sample_loop(model, shape, min(steps, diffusion.num_timesteps), generator=generator, device=device)
    return x


@torch.no_grad()
def validation_loss(model, diffusion: GaussianDiffusion, x0: torch.Tensor, seed: int, batch_size: int = 256) -> float:
    """L_simple on a fixed set of images, timesteps and noise (comparable across evaluations)."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    total = 0.0
    for i in range(0, x0.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        loss, _ = diffusion.training_loss(model, x0[sl], t[sl].to(x0.device), noise[sl].to(x0.device))
        total += loss.item() * x0[sl].shape[0]
    return total / x0.shape[0]


def train(cfg: DDPMConfig) -> dict:
    """Train (or resume) in cfg.train.out_dir; returns the final metrics."""
    tc = cfg.train
    set_threads()
    ctx = setup_distributed(tc.device)
    device = ctx.device
    seed_everything(tc.seed + ctx.rank)
    out = Path(tc.out_dir)
    ckpt_dir = out / "checkpoints"

    images, _ = load_images(tc.dataset, "train", cfg.model.image_size, cfg.model.in_channels)
    valid, _ = load_images(tc.dataset, "valid", cfg.model.image_size, cfg.model.in_channels)
    valid_x0 = to_model_range(valid[: tc.eval_size]).to(device)
    if tc.batch_size % ctx.world_size:
        raise ValueError(f"batch_size={tc.batch_size} must be divisible by the number of processes ({ctx.world_size})")

    model, diffusion = build(cfg, device)
    ema = EMA(model, tc.ema_decay, warmup=tc.ema_warmup)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr)
    schedule = WarmupConstantSchedule(tc.lr, tc.warmup)
    step, resumed, elapsed_before = 0, latest_checkpoint(ckpt_dir), 0.0
    if resumed is not None:
        ckpt = load_checkpoint(resumed, map_location=device)
        saved = DDPMConfig.from_dict(ckpt.config)
        if (saved.model, saved.diffusion) != (cfg.model, cfg.diffusion):
            raise ValueError(f"{resumed} was trained with a different model/diffusion config; use another --train.out_dir")
        step = ckpt.restore(model, optimizer, ema)
        elapsed_before = float(ckpt.extra.get("elapsed", 0.0))  # max_minutes is a budget for the whole run, across resumes
        if ctx.is_distributed and ctx.rank:
            seed_everything(tc.seed + ctx.rank + 7919 * step)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    dmodel = wrap_model(model, ctx)
    logger = MetricsLogger(out / "metrics.jsonl", enabled=ctx.is_main, resume_step=step if resumed else None)
    n_params = count_parameters(model)
    if ctx.is_main:
        print(f"dali-ddpm train: {n_params:,} parameters, {images.shape[0]} {tc.dataset} images, device {device}, "
              f"threads {torch.get_num_threads()}, start step {step}", flush=True)

    def checkpoint(metrics: dict) -> None:
        if ctx.is_main:
            save_checkpoint(checkpoint_path(ckpt_dir, step), model=model, step=step, config=cfg.to_dict(), optimizer=optimizer,
                            ema=ema, metrics=metrics, extra={"n_params": n_params, "elapsed": time.time() - start})
            prune_checkpoints(ckpt_dir, tc.keep_last)

    def sample_png(name: str) -> None:
        if ctx.is_main:
            with ema.applied_to(model):
                model.eval()
                x = sample_grid(model, diffusion, tc.sample_n, tc.sample_steps, tc.seed, device)
                model.train()
            save_grid(x, out / name)

    start, last_log, seen = time.time() - elapsed_before, time.time(), 0
    losses: list[float] = []
    metrics: dict = {}
    bar = progress_bar(total=tc.max_steps, initial=step, enabled=ctx.is_main, desc="train")
    model.train()
    while step < tc.max_steps:
        if tc.max_minutes and time.time() - start > tc.max_minutes * 60:
            break
        idx = batch_indices(step, images.shape[0], tc.batch_size, tc.seed)[ctx.rank :: ctx.world_size]
        x0 = to_model_range(images[idx]).to(device)
        if tc.random_flip:
            flip = torch.rand(x0.shape[0], device=device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        set_lr(optimizer, schedule(step))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.bf16):
            loss, _ = diffusion.training_loss(dmodel, x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        optimizer.step()
        ema.update(model, step)
        step += 1
        seen += tc.batch_size
        losses.append(loss.item())
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.max_steps:
            mean_loss = all_reduce_mean(torch.tensor(sum(losses) / len(losses)), ctx).item()
            now = time.time()
            metrics = {"loss": mean_loss, "lr": schedule(step - 1), "grad_norm": float(grad_norm), "img_per_s": seen / (now - last_log)}
            logger.log(step, **metrics)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{metrics['lr']:.1e}", img_s=f"{metrics['img_per_s']:.0f}")
            losses, seen, last_log = [], 0, now
        if step % tc.eval_every == 0 and ctx.is_main:
            model.eval()
            valid_loss = validation_loss(model, diffusion, valid_x0, tc.seed)
            with ema.applied_to(model):
                valid_loss_ema = validation_loss(model, diffusion, valid_x0, tc.seed)
            model.train()
            logger.log(step, valid_loss=valid_loss, valid_loss_ema=valid_loss_ema)
            metrics.update(valid_loss=valid_loss, valid_loss_ema=valid_loss_ema)
        if step % tc.sample_every == 0:
            sample_png(f"samples_step_{step:08d}.png")
        if step % tc.ckpt_every == 0:
            checkpoint(metrics)
    bar.close()
    minutes = (time.time() - start) / 60
    if ctx.is_main:
        if step % tc.ckpt_every:
            checkpoint(metrics)
        sample_png("samples.png")
        try:
            plot_metrics(out / "metrics.jsonl", out / "loss.png", ["loss", "valid_loss_ema"], log_y=["loss", "valid_loss_ema"])
        except ValueError:
            pass
        print(f"dali-ddpm train: stopped at step {step} after {minutes:.1f} min; run dir {out}", flush=True)
    cleanup_distributed()
    return {"step": step, "minutes": minutes, **metrics}
