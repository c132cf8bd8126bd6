"""`dali-ddpm sample`: load a run's EMA weights and draw a PNG grid (and a denoising-trajectory figure)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from axon_shared import CheckpointError, load_checkpoint, load_model_state, pick_device
from axon_shared.checkpoint import run_checkpoints

from .config import DDPMConfig, SampleConfig, UNetConfig
from .diffusion import GaussianDiffusion
from .model import UNet
from .train import build
from .viz import save_grid, save_trajectory


def load_run(
    run_dir: str | Path, checkpoint: str = "", *, use_ema: bool = True, device="cpu"
) -> tuple[DDPMConfig, UNet, GaussianDiffusion, int]:
    """(config, model in eval mode with the EMA (or raw) weights, diffusion, step) of a training run."""
    _, (path,) = run_checkpoints(checkpoint or run_dir)
    ckpt = load_checkpoint(path)
    ckpt.model_config(UNetConfig)  # a clear error for another package's checkpoint
    cfg = DDPMConfig.from_saved({key: ckpt.config[key] for key in ("model", "diffusion", "data") if key in ckpt.config})
    model, diffusion = build(cfg, device)
    if use_ema:
        if "ema" not in ckpt.tensors:
            raise CheckpointError(f"{path} holds no EMA weights; pass --use_ema false")
        load_model_state(model, ckpt.tensors["ema"], source=path)
    else:
        ckpt.restore(model, rng=False)
    return cfg, model.eval(), diffusion, ckpt.step


@torch.no_grad()
def draw(
    model: UNet,
    diffusion: GaussianDiffusion,
    n: int,
    *,
    sampler: str = "ddpm",
    steps: int = 50,
    eta: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
    device="cpu",
    capture_every: int = 0,
    progress: bool = False,
) -> tuple[torch.Tensor, list, float]:
    """n samples in batches; returns (samples (n, C, S, S) on CPU, trajectory of the first batch, seconds)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    c, s = model.config.in_channels, model.config.image_size
    out, trajectory = [], []
    start = time.time()
    for i in range(0, n, batch_size):
        shape = (min(batch_size, n - i), c, s, s)
        capture = capture_every if i == 0 else 0
        if sampler == "ddpm":
            x, traj = diffusion.p_sample_loop(model, shape, generator=generator, device=device, progress=progress, capture_every=capture)
        else:
            x, traj = diffusion.ddim_sample_loop(
                model, shape, steps, eta=eta, generator=generator, device=device, progress=progress, capture_every=capture
            )
        out.append(x.cpu())
        trajectory = trajectory or traj
    return torch.cat(out), trajectory, time.time() - start


def sample(cfg: SampleConfig) -> dict:
    device = pick_device(cfg.device)
    _, model, diffusion, step = load_run(cfg.run_dir, cfg.checkpoint, use_ema=cfg.use_ema, device=device)
    n_steps = diffusion.num_timesteps if cfg.sampler == "ddpm" else (cfg.steps or 50)
    capture = max(1, n_steps // 50) if cfg.trajectory else 0
    x, trajectory, seconds = draw(
        model,
        diffusion,
        cfg.n,
        sampler=cfg.sampler,
        steps=n_steps,
        eta=cfg.eta,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=device,
        capture_every=capture,
        progress=True,
    )
    out = Path(cfg.out) if cfg.out else Path(cfg.run_dir) / f"samples_{cfg.sampler}{'' if cfg.sampler == 'ddpm' else n_steps}.png"
    save_grid(x, out)
    result = {"samples_png": str(out), "n": cfg.n, "sampler": cfg.sampler, "steps": n_steps, "seconds": round(seconds, 2), "step": step}
    if trajectory:
        result["trajectory_png"] = str(save_trajectory(trajectory, out.with_name(out.stem + "_trajectory.png")))
    print(json.dumps(result))
    return result
