"""Learning-rate schedules as pure functions of the step (nothing to checkpoint: the step determines the lr).

Call `set_lr(optimizer, schedule(step))` before each optimizer step; steps count from 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warm-up to max_lr over `warmup` steps, then cosine decay to min_ratio * max_lr at `total` steps
    (Llama 2: 2000 warm-up steps, decay to 10%); constant at the floor after `total`."""

    max_lr: float
    warmup: int
    total: int
    min_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.max_lr * (step + 1) / self.warmup
        if step >= self.total:
            return self.max_lr * self.min_ratio
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.max_lr * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class WarmupConstantSchedule:
    """Linear warm-up to `max_lr`, then constant (DDPM: 5000 warm-up steps at 2e-4)."""

    max_lr: float
    warmup: int = 0

    def __call__(self, step: int) -> float:
        return self.max_lr * min(1.0, (step + 1) / self.warmup) if self.warmup else self.max_lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
