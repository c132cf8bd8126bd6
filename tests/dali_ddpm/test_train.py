"""Training: overfitting one image, bit-exact resume, the CLI end to end on real data (digits)."""

import json

import pytest
import torch

from axon_shared import latest_checkpoint, load_checkpoint
from dali_ddpm.cli import main
from dali_ddpm.config import DDPMConfig, UNetConfig
from dali_ddpm.data import load_images, shrink_to_fit, to_model_range
from dali_ddpm.diffusion import GaussianDiffusion, beta_schedule
from dali_ddpm.model import UNet


def test_overfits_a_single_image():
    """Trained on one digit only, L_simple falls from ~1 to a few hundredths and ancestral sampling from pure
    noise draws that digit (mean correlation > 0.6 with it; an untrained model's samples stay below 0.5)."""
    torch.manual_seed(0)
    images, _ = load_images("digits", "train", 16)
    target = to_model_range(images[:1])  # (1, 1, 16, 16)
    model = UNet(
        UNetConfig(in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, image_size=16, num_groups=8)
    )
    diffusion = GaussianDiffusion(beta_schedule("linear", 100, 1e-4, 0.2))

    def correlations() -> torch.Tensor:
        samples, _ = diffusion.p_sample_loop(model, (4, 1, 16, 16), generator=torch.Generator().manual_seed(1))
        a = samples.flatten(1) - samples.flatten(1).mean(1, keepdim=True)
        b = target.flatten(1) - target.mean()
        return (a @ b.T).squeeze(1) / (a.norm(dim=1) * b.norm())

    assert correlations().max() < 0.5
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = None
    for _ in range(300):
        loss, _ = diffusion.training_loss(model, target.expand(8, -1, -1, -1))
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 0.5 and loss.item() < 0.05, (first, loss.item())
    corr = correlations()
    assert corr.mean() > 0.6, corr  # measured: 0.96, 0.85, 0.91, 0.37


def _train(tmp_path, name, max_steps):
    args = [
        "train",
        "--preset",
        "tiny",
        "--train.out_dir",
        str(tmp_path / name),
        "--train.steps",
        str(max_steps),
        "--train.checkpoint_every",
        "2",
        "--data.random_flip",
        "true",
        "--model.dropout",
        "0.1",
        "--train.progress",
        "false",
    ]
    return main(args)


def test_resume_is_bit_exact(tmp_path):
    """Stopped at step 3 and resumed to 6 gives exactly the weights, EMA and optimizer state of a straight run
    (dropout and random flips on, so RNG restoration matters)."""
    _train(tmp_path, "straight", 6)
    _train(tmp_path, "resumed", 3)
    first = load_checkpoint(latest_checkpoint(tmp_path / "resumed" / "checkpoints"))
    assert first.step == 3
    _train(tmp_path, "resumed", 6)
    a = load_checkpoint(latest_checkpoint(tmp_path / "straight" / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "resumed" / "checkpoints"))
    assert a.step == b.step == 6
    for group in ("model", "ema", "optimizer"):
        assert a.tensors[group].keys() == b.tensors[group].keys()
        for name in a.tensors[group]:
            assert torch.equal(a.tensors[group][name], b.tensors[group][name]), (group, name)
    assert not torch.equal(a.tensors["model"]["conv_out.weight"], first.tensors["model"]["conv_out.weight"])
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 3, 5, 6]  # the log continues, no duplicated steps


def test_cli_rejects_bad_config(tmp_path):
    with pytest.raises(SystemExit, match="ema_decay"):
        main(["train", "--preset", "tiny", "--train.ema_decay", "1.5", "--train.out_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="DataConfig.dataset='cifar10': must be one of"):
        main(["train", "--preset", "tiny", "--data.dataset", "cifar10", "--train.out_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="SampleConfig.steps=20: applies to the ddim sampler only"):
        main(["sample", "--sampler", "ddpm", "--steps", "20"])


def test_resume_refuses_a_different_model(tmp_path):
    _train(tmp_path, "run", 2)
    with pytest.raises(
        SystemExit, match=r"dali-ddpm train: error: .* another model / diffusion config: model\.ch: 32 in the checkpoints, 64 now"
    ):
        main(["train", "--preset", "tiny", "--train.out_dir", str(tmp_path / "run"), "--model.ch", "64"])


def test_presets_are_valid():
    for name in DDPMConfig.PRESETS:
        cfg = DDPMConfig.from_preset(name)
        assert cfg.model.image_size % 2 ** (len(cfg.model.ch_mult) - 1) == 0
    assert DDPMConfig.from_preset("cifar10").train.ema_decay == 0.9999


def test_shrink_to_fit_is_an_average_pool():
    """A model smaller than the images gets them shrunk by the smallest integer factor that fits (28 -> 14 for a 16x16
    model), each pixel the rounded mean of its block (torch's avg_pool2d is the reference), then centred on the canvas."""
    images = torch.randint(0, 256, (5, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    shrunk = shrink_to_fit(images, 16)
    expected = torch.nn.functional.avg_pool2d(images[:, None].float(), 2)[:, 0].round().to(torch.uint8)
    torch.testing.assert_close(shrunk, expected, rtol=0, atol=0)
    assert shrink_to_fit(images, 28) is images  # fits: unchanged
    assert shrink_to_fit(images, 9).shape == (5, 7, 7)  # 28 / 3 does not fit in 9, 28 / 4 = 7 does
    with pytest.raises(ValueError, match="needs a factor of 3, which does not divide both sides"):
        shrink_to_fit(images, 10)
    canvas, _ = load_images("mnist-5k", "test", 16)
    raw, _ = load_images("mnist-5k", "test", 28)
    assert canvas.shape[-2:] == (16, 16) and canvas[..., 0, :].eq(0).all() and canvas[..., :, 15].eq(0).all()
    torch.testing.assert_close(canvas[:, 0, 1:15, 1:15], shrink_to_fit(raw[:, 0], 16), rtol=0, atol=0)


def test_demo_writes_a_report_without_nan(tmp_path):
    """`dali-ddpm demo` (a 2-second budget and 8 samples standing in for its 3 minutes and 200) writes REPORT.md with
    every metric filled in and the sample grid it links."""
    out = tmp_path / "demo" / "dali_ddpm"
    main(["demo", "--out_dir", str(out), "--max_minutes", "0.03", "--n_samples", "8", "--ddim_steps", "4"])
    report = (out / "REPORT.md").read_text()
    assert report.startswith("## Denoising Diffusion Probabilistic Models (dali_ddpm)")
    assert "nan" not in report.lower()
    assert "| FID-C, DDIM 4 steps eta 1, 8 samples |" in report
    assert (out / "samples.png").is_file() and (out / "loss.png").is_file()


def test_validation_loss_is_unweighted_l_simple_whatever_the_training_weights():
    """Runs trained with Min-SNR weights report the same validation number as uniform ones: plain L_simple on the
    fixed images, timesteps and noise (not the weighted objective, which is smaller and not comparable)."""
    from dali_ddpm.train import validation_loss

    x0 = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model = lambda x_t, t: 0.3 * x_t
    uniform = GaussianDiffusion(beta_schedule("linear", 1000))
    min_snr = GaussianDiffusion(beta_schedule("linear", 1000), loss_weight="min_snr")
    expected = validation_loss(model, uniform, x0, seed=5, batch_size=4)
    assert validation_loss(model, min_snr, x0, seed=5, batch_size=4) == pytest.approx(expected, rel=1e-6)
    generator = torch.Generator().manual_seed(5)
    t, noise = torch.randint(0, 1000, (6,), generator=generator), torch.randn(x0.shape, generator=generator)
    x_t = uniform.q_sample(x0, t, noise)
    assert expected == pytest.approx(((noise - 0.3 * x_t) ** 2).mean().item(), rel=1e-5)
