"""The training loop every stage shares: seeding, AdamW + warmup/cosine lr, gradient clipping, a time budget,
periodic evaluation, checkpoints every N steps and at the end, and exact resumption.

A stage supplies `step_fn(step) -> metrics` (forward, backward; the loop steps the optimizer) and
`eval_fn(step) -> metrics`. Batches must be a pure function of the step (and the seed), and all sampling must draw
from torch's global RNG, which checkpoints save and restore: then a run resumed from its latest checkpoint ends
with exactly the parameters of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from axon_shared.distributed import set_threads
from axon_shared.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from axon_shared.metrics import MetricsLogger
from axon_shared.progress import progress_bar
from axon_shared.schedules import CosineSchedule, set_lr
from axon_shared.seed import seed_everything
from torch import nn

from .config import OptimConfig



def bf16_autocast(model: nn.Module, enabled: bool):
    """Autocast to bfloat16 on the model's device when `enabled` (`optim.bf16`); a no-op context otherwise."""
    return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=enabled)


def make_optimizer(params, optim: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(params, lr=optim.lr, betas=(optim.beta1, optim.beta2), weight_decay=optim.weight_decay, eps=1e-8)


def train_loop(
    *,
    name: str,
    out_dir: str | Path,
    config: dict,
    optim: OptimConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step_fn: Callable[[int], dict],
    eval_fn: Callable[[int], dict] | None = None,
    extra_state: Callable[[], dict] | None = None,
    load_extra_state: Callable[[dict], None] | None = None,
    self_stepping: bool = False,
    eval_at_start: bool = False,
) -> dict:
    """Run steps [resumed_step, optim.max_steps); return the last eval metrics. `model` holds every trained module.
    With self_stepping (PPO: several minibatch updates per iteration), step_fn clips and steps the optimizer itself."""
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    start = 0
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None:
        ckpt = load_checkpoint(latest)
        start = ckpt.restore(model, optimizer)
        if load_extra_state is not None:
            load_extra_state(ckpt.extra)
    else:
        seed_everything(optim.seed)
    logger = MetricsLogger(out_dir / "metrics.jsonl", resume_step=start if latest is not None else None)
    schedule = CosineSchedule(optim.lr, optim.warmup_steps, optim.max_steps, optim.min_lr_ratio)
    began = time.time()
    last_eval: dict = {}
    bar = progress_bar(range(start, optim.max_steps), enabled=optim.progress, desc=name, initial=start, total=optim.max_steps)
    step = start

    if eval_at_start and start == 0 and eval_fn is not None:
        model.eval()
        with torch.random.fork_rng(), bf16_autocast(model, optim.bf16):
            logger.log(0, **eval_fn(0))
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def checkpoint(at: int) -> None:
        extra = extra_state() if extra_state is not None else {}
        save_checkpoint(checkpoint_path(ckpt_dir, at), model=model, optimizer=optimizer, step=at, config=config, extra=extra)
        prune_checkpoints(ckpt_dir, keep_last=1)

    for step in bar:
        set_lr(optimizer, schedule(step))
        model.train()
        t0 = time.time()
        with bf16_autocast(model, optim.bf16):
            metrics = step_fn(step)
        if not self_stepping:
            if optim.grad_clip > 0:
                metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, optim.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        metrics["lr"] = schedule(step)
        metrics["step_seconds"] = time.time() - t0
        done = step + 1
        if done % optim.log_every == 0 or done == optim.max_steps:
            logger.log(done, **metrics)
        bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k in ("loss", "reward", "kl", "accuracy", "score")})
        out_of_time = optim.max_minutes is not None and (time.time() - began) > 60 * optim.max_minutes
        if eval_fn is not None and (done % optim.eval_every == 0 or done == optim.max_steps or out_of_time):
            model.eval()
            with bf16_autocast(model, optim.bf16):
                last_eval = eval_fn(done)
            logger.log(done, **last_eval)
        if done % optim.checkpoint_every == 0 or done == optim.max_steps or out_of_time:
            checkpoint(done)
        if out_of_time:
            print(f"{name}: time budget of {optim.max_minutes} min reached at step {done}")
            break
    bar.close()
    if not last_eval and eval_fn is not None:
        model.eval()
        last_eval = eval_fn(step)
    return last_eval
