"""A toy regression run through the one training loop, for the loop's tests (in-process and under torchrun)."""

from __future__ import annotations

import dataclasses
import os
import signal

import torch
from torch import nn

from axon_shared.config import AxonConfig
from axon_shared.ema import EMA
from axon_shared.training import Trainer, TrainSection


@dataclasses.dataclass
class ToyModel(AxonConfig):
    width: int = 8
    dropout: float = 0.3


@dataclasses.dataclass
class ToyConfig(AxonConfig):
    model: ToyModel = dataclasses.field(default_factory=ToyModel)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)


def toy_config(out_dir, **train) -> ToyConfig:
    values = dict(
        out_dir=str(out_dir),
        steps=6,
        batch_size=4,
        lr=1e-2,
        warmup_steps=2,
        eval_every=2,
        checkpoint_every=2,
        log_every=1,
        progress=False,
        keep_last=10,
    )
    return ToyConfig(train=TrainSection(**{**values, **train}))


def toy_model(config: ToyModel) -> nn.Module:
    return nn.Sequential(nn.Linear(4, config.width), nn.Tanh(), nn.Dropout(config.dropout), nn.Linear(config.width, 1))


DATA = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))  # 4 inputs, 1 target


def toy_loss(model, rows):
    return nn.functional.mse_loss(model(rows[:, :4]), rows[:, 4:]), {}


def fit_toy(cfg: ToyConfig, *, signal_at: int | None = None, signal_rank: int = 0, ema: bool = True, evaluate=None, **fit_kwargs):
    """Train the toy run; with signal_at, the process sends itself SIGINT (or SIGTERM on rank > 0) during that step."""
    with Trainer(cfg.train, cfg, name="toy") as trainer:
        model = toy_model(cfg.model)
        average = EMA(model, 0.9) if ema else None

        def batch(step, micro):
            if signal_at is not None and step + 1 == signal_at and micro == 0 and trainer.ctx.rank == signal_rank:
                os.kill(os.getpid(), signal.SIGINT if trainer.ctx.world_size == 1 else signal.SIGTERM)
            return DATA[trainer.batch_indices(len(DATA), step, micro)]

        result = trainer.fit(model, loss=toy_loss, batch=batch, ema=average, evaluate=evaluate, **fit_kwargs)
        return result, model, average
