"""`train.bf16` loses no accuracy: each package's `tiny` preset trained for 200 steps under bf16 autocast ends
within 2% of the same run in float32 (same seed, so the same batches, noise and timesteps; the loss compared is
the mean of the last 20 steps' training losses, which smooths the per-batch noise both runs share).

Autocast keeps the weights, the optimizer state and the losses in float32 and runs the matmuls in bf16 (8 bits of
mantissa); a model or loss that kept something in bf16 that needs float32 (a softmax, a norm's variance, the
label-smoothing sum, a diffusion schedule constant) drifts away from the float32 run and fails here. A run that
did not train at all would pass trivially, so each test also checks that the loss fell (by > 10%).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from axon_shared.metrics import read_metrics

pytestmark = pytest.mark.native_bf16  # where bf16 is emulated the engine trains in float32: nothing to compare

STEPS, WINDOW, TOLERANCE = 200, 20, 0.02
QUIET = dict(steps=STEPS, log_every=1, eval_every=10_000, checkpoint_every=10_000, progress=False)


def final_loss(run: Path) -> tuple[float, float]:
    """(first step's loss, mean of the last WINDOW steps' losses)."""
    losses = [row["train/loss"] for row in read_metrics(run / "metrics.jsonl") if "train/loss" in row]
    assert len(losses) == STEPS
    return losses[0], sum(losses[-WINDOW:]) / WINDOW


def assert_tracks(train, tmp_path: Path) -> None:
    first, fp32 = final_loss(train(tmp_path / "fp32", False))
    _, bf16 = final_loss(train(tmp_path / "bf16", True))
    assert fp32 < 0.9 * first, f"the float32 run did not train ({first:.3f} -> {fp32:.3f}): nothing to compare"
    assert abs(bf16 - fp32) <= TOLERANCE * fp32, f"bf16 ends at {bf16:.4f}, float32 at {fp32:.4f}: more than {TOLERANCE:.0%} apart"


def test_x_llama(tmp_path):
    from x_llama.config import TrainConfig
    from x_llama.train import train

    assert_tracks(lambda out, bf16: train(TrainConfig.from_preset("tiny", train=dict(out_dir=str(out), bf16=bf16, **QUIET))), tmp_path)


def test_transformer(tmp_path):
    from transformer.config import TrainConfig
    from transformer.train import train

    def run(out: Path, bf16: bool) -> Path:
        train(TrainConfig.from_preset("tiny", train=dict(out_dir=str(out), bf16=bf16, **QUIET)))
        return out

    assert_tracks(run, tmp_path)


def test_dali_ddpm(tmp_path):
    from dali_ddpm.config import DDPMConfig
    from dali_ddpm.train import train

    def run(out: Path, bf16: bool) -> Path:
        train(DDPMConfig.from_preset("tiny", train=dict(out_dir=str(out), bf16=bf16, sample_every=10_000, **QUIET)))
        return out

    assert_tracks(run, tmp_path)
