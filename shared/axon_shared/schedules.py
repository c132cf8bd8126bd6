"""Learning-rate schedules as pure functions of the step (nothing to checkpoint: the step determines the lr).

Call `set_lr(optimizer, schedule(step))` before each optimizer step; steps count from 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoamSchedule:
    """lrate = factor * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)  (Vaswani et al. 2017, eq. 3).

    Linear warm-up for `warmup` steps, then decay with the inverse square root of the step; the peak,
    reached at step = warmup, is factor * (d_model * warmup)^-0.5.
    """

    d_model: int
    warmup: int = 4000
    factor: float = 1.0

    def __call__(self, step: int) -> float:
        step = max(step, 1)
        return self.factor * self.d_model**-0.5 * min(step**-0.5, step * self.warmup**-1.5)


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
