"""`dali-ddpm export --format diffusers --out DIR`: a trained run as a diffusers `DDPMPipeline` folder.

The folder is what `DDPMPipeline.save_pretrained` writes: `model_index.json`, `unet/` (`config.json` and
`diffusion_pytorch_model.safetensors`: the run's EMA weights, renamed by `dali_ddpm.convert`) and
`scheduler/scheduler_config.json` (a `DDPMScheduler` holding our schedule), plus `dali_ddpm.json` (where it came
from and how to sample it as we do). Loading it unpickles nothing.

How our diffusion config maps onto the scheduler's (`scheduler_config`):

| ours (`DiffusionConfig`) | diffusers (`DDPMScheduler` / `DDIMScheduler`) |
|---|---|
| `timesteps`, `beta_start`, `beta_end` | `num_train_timesteps`, `beta_start`, `beta_end` |
| `schedule`: `linear` / `cosine` | `beta_schedule`: `linear` / `squaredcos_cap_v2` |
| `variance`: `fixedsmall` / `fixedlarge` | `variance_type`: `fixed_small` / `fixed_large` |
| `clip_denoised` | `clip_sample` (range 1.0; no dynamic thresholding) |
| `prediction`: `eps` / `x0` / `v` | `prediction_type`: `epsilon` / `sample` / `v_prediction` |
| DDIM timesteps `[0, k, 2k, ...]` reversed, `k = T // n`, and abar = 1 after the last step | `timestep_spacing="leading"`, `steps_offset=0`; `DDIMScheduler`'s default `set_alpha_to_one=True` |

Sampling there gives our samples (tested, `tests/dali_ddpm/test_export.py`), with two arguments to know:

    pipe = DDPMPipeline.from_pretrained(DIR)
    pipe(batch_size=n, generator=torch.Generator().manual_seed(s), num_inference_steps=T)   # dali-ddpm sample --seed s
    DDIMPipeline.from_pretrained(DIR)(batch_size=n, generator=..., num_inference_steps=k, eta=0.0,
                                      use_clipped_model_output=clip_denoised)               # --sampler ddim --steps k

- `num_inference_steps=T`: with fewer steps diffusers' DDPM sampler skips timesteps, which our ancestral sampler
  never does (its default of 1000 is T only for T = 1000).
- `use_clipped_model_output`: our DDIM step re-derives eps from the clipped x0 (as guided-diffusion does); diffusers
  does so only when asked, and a scheduler config cannot ask for it.
- The same seed gives the same images because both draw from the generator in the same order: x_T, then one noise
  tensor per step (diffusers skips the draw at t = 0, the last one, which our sampler multiplies by zero).

Before anything is written the export checks itself: the `UNet2DModel` must load every converted tensor and give
our network's output on a fixed input, and the scheduler's betas and abar must be ours. What cannot map raises a
ConfigError naming the field: a UNet with `ch_mult[0] != 1` (diffusers' `conv_in` widens straight to
`block_out_channels[0]`; ours widens in the first residual block), and a schedule, variance or prediction with no
diffusers name (all of this package's choices have one; learned variances, which diffusers' `learned_range` would
take, are not implemented here: `HYBRID_MISSING` in config.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from axon_shared.config import ConfigError

from .config import DiffusionConfig, ExportConfig, UNetConfig
from .convert import diffusers_unet_kwargs, to_diffusers_state_dict
from .diffusion import GaussianDiffusion
from .model import UNet

SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
VARIANCES = {"fixedsmall": "fixed_small", "fixedlarge": "fixed_large"}
PREDICTIONS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}

# The self-check's tolerances. UNet: the converted network agrees with ours to float32 rounding (~1e-6 relative on the
# test layouts, tests/dali_ddpm/test_model.py); 1e-3 of the output's scale leaves room for deep layouts and is far
# below what a wrong tensor makes (O(1)). Schedule: diffusers keeps betas and their cumulative product in float32,
# ours in float64; they differ by < 2e-6 for T = 1000.
UNET_RTOL = 1e-3
SCHEDULE_ATOL = 1e-5


def _name(table: dict[str, str], config: Any, field: str, what: str) -> str:
    value = getattr(config, field)
    if value not in table:
        raise ConfigError(
            f"{type(config).__name__}.{field}={value!r}: diffusers has no {what} for it; exportable: "
            + ", ".join(f"{ours!r} (diffusers {theirs!r})" for ours, theirs in table.items())
        )
    return table[value]


def scheduler_config(diffusion: DiffusionConfig) -> dict[str, Any]:
    """`DDPMScheduler(**scheduler_config(cfg))` runs our reverse process (see the module docstring's table)."""
    return dict(
        num_train_timesteps=diffusion.timesteps,
        beta_start=diffusion.beta_start,
        beta_end=diffusion.beta_end,
        beta_schedule=_name(SCHEDULES, diffusion, "schedule", "beta_schedule"),
        variance_type=_name(VARIANCES, diffusion, "variance", "variance_type"),
        clip_sample=diffusion.clip_denoised,
        clip_sample_range=1.0,
        prediction_type=_name(PREDICTIONS, diffusion, "prediction", "prediction_type"),
        thresholding=False,
        timestep_spacing="leading",
        steps_offset=0,
        rescale_betas_zero_snr=False,
    )


def check_unet_layout(cfg: UNetConfig) -> None:
    """A ConfigError for the layouts `dali_ddpm.convert` cannot express as a `UNet2DModel`."""
    if cfg.ch_mult[0] != 1:
        raise ConfigError(
            f"UNetConfig.ch_mult={cfg.ch_mult!r}: diffusers' UNet2DModel has no layout for ch_mult[0] != 1: its conv_in "
            f"outputs block_out_channels[0] = ch * ch_mult[0] = {cfg.ch * cfg.ch_mult[0]} channels and its timestep "
            f"embedding starts at that width, while ours keeps conv_in and the embedding at ch = {cfg.ch} and widens in "
            f"the first residual block; such a run cannot be exported (train with ch = {cfg.ch * cfg.ch_mult[0]} and "
            "ch_mult[0] = 1 instead)"
        )


@torch.no_grad()
def to_diffusers_pipeline(model: UNet, diffusion: DiffusionConfig):
    """A `DDPMPipeline` (float32, CPU, eval mode) with `model`'s weights and our schedule, checked against `model`."""
    try:
        from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    except ImportError as error:
        raise ConfigError(
            f"ExportConfig.format='diffusers' needs the diffusers package ({error}); pip install diffusers==0.42.1 (the version tested)"
        ) from None

    cfg = model.config
    check_unet_layout(cfg)
    scheduler = DDPMScheduler(**scheduler_config(diffusion))
    unet = UNet2DModel(**diffusers_unet_kwargs(cfg))
    state = to_diffusers_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    own = unet.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [
        f"{k}: ours {tuple(v.shape)} vs diffusers {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"UNetConfig {cfg.to_dict()}: this layout is not covered by dali_ddpm.convert (diffusers tensors without ours: "
            f"{missing[:4]}, ours without a diffusers tensor: {unexpected[:4]}, shape mismatches: {shapes[:4]})"
        )
    unet.load_state_dict(state, strict=True)
    unet.eval()

    # the self-check: the same network and the same schedule, or nothing is written
    ours = GaussianDiffusion.from_config(diffusion)
    theirs = {"betas": scheduler.betas.double(), "abar": scheduler.alphas_cumprod.double()}
    for name, values in theirs.items():
        mine = getattr(ours, name)
        worst = float((values - mine).abs().max()) if values.shape == mine.shape else float("inf")
        if not worst <= SCHEDULE_ATOL:
            raise ConfigError(
                f"DiffusionConfig {diffusion.to_dict()}: diffusers' {name} differ from ours by {worst:.2e} (> {SCHEDULE_ATOL}); "
                "this schedule does not map onto DDPMScheduler"
            )
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size, generator=generator)
    t = torch.tensor([0, diffusion.timesteps - 1])
    model_device, was_training = next(model.parameters()).device, model.training
    try:
        expected = model.eval()(x.to(model_device), t.to(model_device)).float().cpu()
    finally:
        model.train(was_training)
    worst = float((unet(x, t).sample - expected).abs().max())
    scale = 1.0 + float(expected.abs().max())
    if not worst <= UNET_RTOL * scale:
        raise ConfigError(
            f"UNetConfig {cfg.to_dict()}: the converted UNet2DModel's output differs from ours by {worst:.2e} "
            f"(> {UNET_RTOL} x {scale:.3g}); this layout is not covered by dali_ddpm.convert"
        )
    return DDPMPipeline(unet=unet, scheduler=scheduler)


def export_diffusers(model: UNet, diffusion: DiffusionConfig, out_dir: str | Path, *, info: dict[str, Any] | None = None) -> Path:
    """Write `model` and `diffusion` as a `DDPMPipeline` folder (see the module docstring); returns the folder.

    Written into a temporary sibling folder and moved into place at the end; an existing `out_dir` is replaced only
    if it is an earlier export (it holds model_index.json)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "model_index.json").is_file())):
        raise ConfigError(
            f"ExportConfig.out={str(out)!r}: exists and is not a diffusers export (no model_index.json); choose a new folder or remove it"
        )
    pipe = to_diffusers_pipeline(model, diffusion)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        sampling = {
            "ddpm": {"pipeline": "DDPMPipeline", "num_inference_steps": diffusion.timesteps},
            "ddim": {"pipeline": "DDIMPipeline", "eta": 0.0, "use_clipped_model_output": diffusion.clip_denoised},
        }
        record = {**(info or {}), "model": model.config.to_dict(), "diffusion": diffusion.to_dict(), "sample_like_dali_ddpm": sampling}
        (tmp / "dali_ddpm.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old.exists() and not out.exists():
                old.rename(out)  # keep the earlier export
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


def export_command(cfg: ExportConfig) -> Path:
    """`dali-ddpm export --run_dir RUN --format diffusers --out DIR` (the EMA weights unless --use_ema false)."""
    from .sample import load_run

    run, model, _, step = load_run(cfg.run_dir, cfg.checkpoint, use_ema=cfg.use_ema, device="cpu")
    out = Path(cfg.out) if cfg.out else Path(cfg.run_dir) / "diffusers"
    info = {"run_dir": cfg.run_dir, "checkpoint": cfg.checkpoint, "step": step, "weights": "ema" if cfg.use_ema else "raw"}
    out = export_diffusers(model, run.diffusion, out, info=info)
    print(f"wrote {out} (diffusers DDPMPipeline, step {step}, {info['weights']} weights)")
    return out
