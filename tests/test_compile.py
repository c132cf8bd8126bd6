"""`train.compile`: every package's training loss (the model call and the loss) compiles to one graph
(`torch.compile(fullgraph=True)`, the engine's setting) and trains as the eager code does: the first steps' losses
of each `tiny` preset equal the eager ones recorded in tests/regression/tiny_losses.json, to float32 rounding
(compiled kernels sum in another order, and inside the graph attention runs as explicit matmuls)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch.testing import assert_close

from axon_shared.config import ConfigError
from axon_shared.metrics import read_metrics

RECORDED = json.loads((Path(__file__).parent / "regression" / "tiny_losses.json").read_text())["losses"]
STEPS = 2
COMPILED = dict(steps=STEPS, compile=True, log_every=1, eval_every=1000, checkpoint_every=1000, progress=False)


def losses(run: Path) -> list[float]:
    return [row["train/loss"] for row in read_metrics(run / "metrics.jsonl") if "train/loss" in row]


def test_x_llama_compiled(tmp_path):
    from x_llama.config import TrainConfig
    from x_llama.train import train

    train(TrainConfig.from_preset("tiny", train=dict(out_dir=str(tmp_path), **COMPILED)))
    assert_close(losses(tmp_path), RECORDED["x_llama"][:STEPS], rtol=1e-5, atol=0)


def test_transformer_compiled(tmp_path):
    """Dropout off on both sides: a compiled graph draws its dropout masks from inductor's generator, not eager's."""
    from transformer.config import TrainConfig
    from transformer.train import train

    runs = {}
    for compiled in (False, True):
        runs[compiled] = tmp_path / str(compiled)
        train(
            TrainConfig.from_preset(
                "tiny", model=dict(dropout=0.0), train=dict(out_dir=str(runs[compiled]), **COMPILED | dict(compile=compiled))
            )
        )
    assert_close(losses(runs[True]), losses(runs[False]), rtol=1e-5, atol=0)


def test_dali_ddpm_compiled(tmp_path, monkeypatch):
    """The loss draws t and the noise inside the graph: with fallback_random the compiled graph draws them from
    torch's generator as eager code does, so the numbers are comparable."""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    from dali_ddpm.config import DDPMConfig
    from dali_ddpm.train import train

    train(DDPMConfig.from_preset("tiny", train=dict(out_dir=str(tmp_path), sample_every=1000, **COMPILED)))
    assert_close(losses(tmp_path), RECORDED["dali_ddpm"][:STEPS], rtol=1e-5, atol=0)


def test_a_loss_that_breaks_the_graph_is_a_clear_error(tmp_path):
    import dataclasses

    import torch

    from axon_shared.config import AxonConfig
    from axon_shared.training import Trainer, TrainSection

    @dataclasses.dataclass
    class Toy(AxonConfig):
        train: TrainSection = dataclasses.field(default_factory=TrainSection)

    cfg = Toy(train=TrainSection(out_dir=str(tmp_path), steps=1, compile=True, progress=False))

    def loss(model, rows):
        value = (model(rows[:, :4]) - rows[:, 4:]).pow(2).mean()
        if float(value) > 0:  # reads a value back inside the loss: a graph break
            value = value * 1.0
        return value, {}

    with (
        Trainer(cfg.train, cfg, name="toy") as trainer,
        pytest.raises(ConfigError, match="does not compile to one graph.*set compile false"),
    ):
        trainer.fit(torch.nn.Linear(4, 1), loss=loss, batch=lambda step, micro: torch.ones(2, 5))
