"""`dali-ddpm export --format diffusers`, checked by diffusers 0.42.1 itself: `DDPMPipeline.from_pretrained` loads the
folder and, from the same seed, samples what our DDPM sampler samples; `DDIMPipeline` and `DDIMScheduler` likewise
with our DDIM sampler; a wrong mapping is refused before anything is written; what cannot map is a clear error.

Same noise on both sides: both samplers draw from the generator they are given in the same order (x_T, then one
noise tensor of the batch's shape per step; diffusers skips the draw at t = 0, the last, which ours multiplies by
zero), so identically seeded generators give both the same noise. The pipelines are run as users run them; a spy on
`scheduler.step` records the last step's unclamped output, which is compared with ours, as are the images the
pipeline returns ((x + 1) / 2 clamped to [0, 1]).
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from torch.testing import assert_close

from axon_shared import save_checkpoint
from axon_shared.config import ConfigError
from dali_ddpm import export as export_module
from dali_ddpm.cli import main
from dali_ddpm.config import DataConfig, DDPMConfig, DiffusionConfig, ExportConfig, UNetConfig
from dali_ddpm.diffusion import GaussianDiffusion, beta_schedule
from dali_ddpm.export import export_diffusers
from dali_ddpm.model import UNet
from dali_ddpm.sample import draw

T = 50  # few timesteps so that a whole chain takes a fraction of a second; beta_end 0.2 brings abar_T to ~e^-5
N = 4  # images per chain
# Float32 on both sides, with different kernels (UNet: ~1e-6, tests/dali_ddpm/test_model.py) and schedule constants
# (ours float64 cast to float32, theirs computed in float32), accumulated over the chain. Measured worst differences:
# 3.1e-5 on samples in [-1, 1] (cosine schedule with x0 prediction, where the float32 constants near t = T amplify
# rounding), 5.3e-5 on unclipped samples up to 103 (6e-6 relative). The tolerance leaves a margin of >= 6x and is
# >= 1000x below what a wrong variance, clipping, schedule or prediction mapping makes (0.31 to 102, measured in
# test_a_wrong_scheduler_mapping_is_caught).
TOL = dict(atol=2e-4, rtol=1e-4)

# every value of every mapped field at least once: schedule, variance, clipping, prediction
DIFFUSIONS = {
    "paper": dict(),  # linear, fixedlarge, clipping, eps
    "cosine-fixedsmall-x0": dict(schedule="cosine", variance="fixedsmall", prediction="x0"),
    "fixedsmall-no-clip": dict(variance="fixedsmall", clip_denoised=False),
    "cosine-v": dict(schedule="cosine", prediction="v"),
}
# a small UNet of the full structure (two levels, down/up-sampling, attention at 4x4 and in the middle): 0.18M parameters
LAYOUT = UNetConfig(in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, image_size=8, num_groups=8)
SHAPE = (N, 1, 8, 8)


def diffusion_config(**overrides) -> DiffusionConfig:
    return DiffusionConfig(**{"timesteps": T, "beta_end": 0.2, **overrides})


def random_unet(seed: int = 0, cfg: UNetConfig | None = None) -> UNet:
    """LAYOUT with random weights at a scale where every layer matters, the zero-initialised ones included: weights
    N(0, 1/fan_in), norm gains N(1, 0.1), biases N(0, 0.1); the output has a std of ~0.5, so the network, not the
    schedule alone, shapes the chain."""
    torch.manual_seed(seed)
    model = UNet(cfg or LAYOUT).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0, p[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1, 0.1)
            else:
                p.normal_(0, 0.1)
    return model


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spy_on_steps(pipe) -> list[torch.Tensor]:
    """Record every `prev_sample` the pipeline's scheduler returns (the pipeline clamps only the last one)."""
    outputs, step = [], pipe.scheduler.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        outputs.append(out.prev_sample.clone())
        return out

    pipe.scheduler.step = recording_step
    return outputs


def as_images(x: torch.Tensor) -> torch.Tensor:
    """What a diffusers pipeline returns for output_type='pt'."""
    return (x / 2 + 0.5).clamp(0, 1)


def run_ddpm_pipeline(pipe) -> tuple[torch.Tensor, torch.Tensor, int]:
    pipe.set_progress_bar_config(disable=True)
    steps = spy_on_steps(pipe)
    images = pipe(batch_size=N, generator=generator(), num_inference_steps=T, output_type="pt").images
    return images, steps[-1], len(steps)


@pytest.fixture(scope="module")
def model() -> UNet:
    return random_unet()


@pytest.mark.parametrize("case", list(DIFFUSIONS))
def test_ddpm_pipeline_samples_what_our_sampler_samples(model, tmp_path, case):
    cfg = diffusion_config(**DIFFUSIONS[case])
    out = export_diffusers(model, cfg, tmp_path / "pipe")
    pipe = DDPMPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    images, last, n_steps = run_ddpm_pipeline(pipe)
    ours, _, _ = draw(model, GaussianDiffusion.from_config(cfg), N, sampler="ddpm", batch_size=N, seed=0)  # `dali-ddpm sample`
    assert n_steps == T
    assert ours.std() > 0.3  # a real comparison: the chains end far from zero
    if cfg.clip_denoised:  # x_0 is the clipped x0_hat: the clamp to images loses nothing, so most pixels must be inside
        assert ((ours > -1) & (ours < 1)).float().mean() > 0.2
    assert_close(last, ours, **TOL)
    assert_close(images, as_images(ours), **TOL)


@pytest.mark.parametrize("clip, eta", [(True, 0.0), (False, 0.0), (True, 0.5)])
def test_ddim_pipeline_samples_what_our_ddim_sampler_samples(model, tmp_path, clip, eta):
    """`DDIMPipeline.from_pretrained(DIR)` (it converts the folder's DDPMScheduler to a DDIMScheduler) with eta and
    10 of the 50 steps; `use_clipped_model_output=clip` as the module docstring of dali_ddpm.export says. For eta = 0
    also `DDIMScheduler.from_pretrained(DIR, subfolder="scheduler")` driven by hand."""
    cfg = diffusion_config(variance="fixedsmall", clip_denoised=clip)
    out = export_diffusers(model, cfg, tmp_path / "pipe")
    pipe = DDIMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    steps = spy_on_steps(pipe)
    images = pipe(
        batch_size=N, generator=generator(), eta=eta, num_inference_steps=10, use_clipped_model_output=clip, output_type="pt"
    ).images
    ours, _, _ = draw(model, GaussianDiffusion.from_config(cfg), N, sampler="ddim", steps=10, eta=eta, batch_size=N, seed=0)
    assert len(steps) == 10 and pipe.scheduler.timesteps.tolist() == list(range(45, -1, -5))
    assert ours.std() > 0.3
    assert_close(steps[-1], ours, **TOL)
    assert_close(images, as_images(ours), **TOL)

    if eta == 0:
        scheduler = DDIMScheduler.from_pretrained(out, subfolder="scheduler")
        unet = UNet2DModel.from_pretrained(out, subfolder="unet").eval()
        scheduler.set_timesteps(10)
        x = torch.randn(SHAPE, generator=generator())
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x, eta=0.0, use_clipped_model_output=clip).prev_sample
        assert_close(x, ours, **TOL)


def test_the_folder_holds_our_schedule_by_name(model, tmp_path):
    cfg = diffusion_config(variance="fixedsmall", clip_denoised=False, prediction="v")
    out = export_diffusers(model, cfg, tmp_path / "pipe")
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DDPMScheduler"
    expected = dict(
        num_train_timesteps=T,
        beta_start=1e-4,
        beta_end=0.2,
        beta_schedule="linear",
        variance_type="fixed_small",
        clip_sample=False,
        prediction_type="v_prediction",
        timestep_spacing="leading",
        steps_offset=0,
        thresholding=False,
    )
    assert {k: config[k] for k in expected} == expected
    assert config["trained_betas"] is None
    scheduler = DDPMScheduler.from_pretrained(out, subfolder="scheduler")
    assert_close(scheduler.betas.double(), beta_schedule("linear", T, 1e-4, 0.2), atol=1e-8, rtol=0)  # float32 rounding
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt*"))  # nothing to unpickle
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_a_wrong_scheduler_mapping_is_caught(model, tmp_path):
    """Negative controls for the tolerance: each plausible wrong mapping, put into the loaded pipeline, moves the samples
    by far more than TOL."""
    cfg = diffusion_config(variance="fixedsmall")
    out = export_diffusers(model, cfg, tmp_path / "pipe")
    ours, _, _ = draw(model, GaussianDiffusion.from_config(cfg), N, sampler="ddpm", batch_size=N, seed=0)
    good = DDPMPipeline.from_pretrained(out).scheduler.config
    wrong = {
        "variance": dict(variance_type="fixed_large"),
        "clipping": dict(clip_sample=False),
        "schedule": dict(beta_schedule="squaredcos_cap_v2"),
        "prediction": dict(prediction_type="sample"),
    }
    for name, change in wrong.items():
        pipe = DDPMPipeline.from_pretrained(out)
        pipe.scheduler = DDPMScheduler.from_config({**good, **change})
        _, last, _ = run_ddpm_pipeline(pipe)
        assert (last - ours).abs().max() > 100 * TOL["atol"], name


def test_a_wrong_weight_or_schedule_mapping_is_refused_before_writing(model, tmp_path, monkeypatch):
    """The export's self-check: q and k swapped in the converted attention (a plausible converter bug), or the cosine
    schedule written as diffusers' linear, raise a ConfigError and leave nothing on disk."""
    convert = export_module.to_diffusers_state_dict

    def swap_q_k(state):
        out = convert(state)
        for name in [n for n in out if ".to_q." in n]:
            k = name.replace(".to_q.", ".to_k.")
            out[name], out[k] = out[k], out[name]
        return out

    monkeypatch.setattr(export_module, "to_diffusers_state_dict", swap_q_k)
    with pytest.raises(ConfigError, match="output differs from ours"):
        export_diffusers(model, diffusion_config(), tmp_path / "pipe")
    monkeypatch.setattr(export_module, "to_diffusers_state_dict", convert)
    monkeypatch.setitem(export_module.SCHEDULES, "cosine", "linear")
    with pytest.raises(ConfigError, match="betas differ from ours"):
        export_diffusers(model, diffusion_config(schedule="cosine"), tmp_path / "pipe")
    assert not list(tmp_path.iterdir())


def write_run(run_dir, ema: UNet, raw: UNet, diffusion: DiffusionConfig, step: int = 7) -> None:
    """A run directory as `dali-ddpm train` leaves it (config, weights, EMA weights), without training."""
    cfg = DDPMConfig(model=ema.config, diffusion=diffusion, data=DataConfig(dataset="digits", random_flip=False))
    save_checkpoint(
        run_dir / "checkpoints" / f"step_{step:08d}.safetensors",
        model=raw,
        ema=types.SimpleNamespace(state_dict=ema.state_dict),
        step=step,
        config=cfg.to_dict(),
        rng=False,
    )


def test_cli_exports_the_runs_ema_weights(model, tmp_path):
    raw = random_unet(seed=1)
    cfg = diffusion_config()
    write_run(tmp_path / "run", model, raw, cfg)
    x = torch.randn(2, 1, 8, 8, generator=generator())
    t = torch.tensor([3, 40])
    with torch.no_grad():
        expected, expected_raw = model(x, t), raw(x, t)

    for use_ema, weights in ((True, expected), (False, expected_raw)):
        out = main(["export", "--run_dir", str(tmp_path / "run"), "--format", "diffusers", "--use_ema", str(use_ema).lower()])
        assert out == tmp_path / "run" / "diffusers"  # the default --out; the second export replaces the first
        unet = UNet2DModel.from_pretrained(out, subfolder="unet").eval()
        with torch.no_grad():
            assert_close(unet(x, t).sample, weights, atol=1e-5, rtol=1e-4)
        info = json.loads((out / "dali_ddpm.json").read_text())
        assert info["step"] == 7 and info["weights"] == ("ema" if use_ema else "raw")
        assert info["sample_like_dali_ddpm"]["ddim"]["use_clipped_model_output"] is True
    assert (expected - expected_raw).abs().max() > 0.1  # the two exports really differ

    main(["export", "--run_dir", str(tmp_path / "run"), "--out", str(tmp_path / "elsewhere")])
    assert (tmp_path / "elsewhere" / "model_index.json").is_file()


def test_what_cannot_map_is_a_clear_error(model, tmp_path, monkeypatch):
    # a layout diffusers' UNet2DModel has no equivalent for
    wide = random_unet(cfg=LAYOUT.replace(ch_mult=(2, 2)))
    with pytest.raises(ConfigError, match=r"ch_mult=\(2, 2\): diffusers' UNet2DModel has no layout for ch_mult\[0\] != 1"):
        export_diffusers(wide, diffusion_config(), tmp_path / "wide")
    assert not (tmp_path / "wide").exists()

    # schedule / variance / prediction names diffusers lacks (none of this package's choices: a config from elsewhere)
    for field, value, what in (
        ("schedule", "sigmoid-ish", "beta_schedule"),
        ("variance", "learned", "variance_type"),
        ("prediction", "score", "prediction_type"),
    ):
        cfg = diffusion_config()
        setattr(cfg, field, value)
        with pytest.raises(ConfigError, match=f"DiffusionConfig.{field}='{value}': diffusers has no {what}"):
            export_diffusers(model, cfg, tmp_path / "x")

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a diffusers export"):
        export_diffusers(model, diffusion_config(), tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"

    with pytest.raises(ConfigError, match="ExportConfig.format='onnx'"):
        ExportConfig(format="onnx")
    with pytest.raises(SystemExit, match="format"):
        main(["export", "--format", "onnx"])
    with pytest.raises(SystemExit, match="no checkpoints"):
        main(["export", "--run_dir", str(tmp_path)])

    monkeypatch.setitem(sys.modules, "diffusers", None)  # diffusers is not a dependency of dali_ddpm, only of its tests
    with pytest.raises(ConfigError, match="needs the diffusers package"):
        export_diffusers(model, diffusion_config(), tmp_path / "x")
