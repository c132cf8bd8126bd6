"""Exponential moving average of weights: shadow <- decay * shadow + (1 - decay) * param.

DDPM samples from EMA weights with decay 0.9999 (Ho et al. 2020, appendix B). That average spans ~10k steps, so a
run of a few thousand steps samples from weights still dominated by their random initialisation. `warmup=True`
uses decay_n = min(decay, (1 + n) / (10 + n)) at update n (the TensorFlow ExponentialMovingAverage num_updates
rule): the average covers about the last 10% of steps early on and reaches `decay` after ~10 / (1 - decay) updates.
The caller passes n (the optimizer step), so resuming needs no extra state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA:
    """Keeps float32 shadow copies of a model's floating-point parameters and buffers."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.shadow = {name: t.detach().clone().float() for name, t in model.state_dict().items() if t.is_floating_point()}

    def decay_at(self, step: int | None) -> float:
        """The decay used by the update made after optimizer step `step` (0-based)."""
        if not self.warmup:
            return self.decay
        if step is None or step < 0:
            raise ValueError("EMA(warmup=True).update needs the step number: ema.update(model, step)")
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        decay = self.decay_at(step)
        state = model.state_dict()
        for name, shadow in self.shadow.items():
            shadow.lerp_(state[name].float(), 1.0 - decay)  # shadow + (1 - decay) (param - shadow)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        state = model.state_dict()
        for name, shadow in self.shadow.items():
            state[name].copy_(shadow)

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily swap the EMA weights into `model` (e.g. for sampling), restoring them afterwards."""
        backup = {name: t.detach().clone() for name, t in model.state_dict().items() if name in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            state = model.state_dict()
            with torch.no_grad():
                for name, tensor in backup.items():
                    state[name].copy_(tensor)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(tensors))
        if missing:
            raise KeyError(f"EMA state is missing {missing[:5]}")
        for name, shadow in self.shadow.items():
            shadow.copy_(tensors[name])
