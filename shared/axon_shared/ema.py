"""Exponential moving average of weights: shadow <- decay * shadow + (1 - decay) * param.

DDPM samples from EMA weights with decay 0.9999 (Ho et al. 2020, appendix B).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA:
    """Keeps float32 shadow copies of a model's floating-point parameters and buffers."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {name: t.detach().clone().float() for name, t in model.state_dict().items() if t.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        state = model.state_dict()
        for name, shadow in self.shadow.items():
            shadow.lerp_(state[name].float(), 1.0 - self.decay)  # shadow + (1 - decay) (param - shadow)

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
