"""`dali-ddpm train`: Algorithm 1 of Ho et al. (2020) with the paper's recipe (appendix B), through the one training
loop (axon_shared.training).

Adam, linear warm-up to a constant lr, gradient-norm clipping, an EMA of the weights (samples come from the EMA
weights), optional random horizontal flips and bf16 autocast, DDP under torchrun, exact resume from the latest
checkpoint in out_dir (batches are a pure function of the step; RNG, optimizer and EMA are restored).
"""

from __future__ import annotations

import torch

from axon_shared import EMA, WarmupConstantSchedule
from axon_shared.training import Trainer, count_parameters

from .config import DDPMConfig
from .data import load_images, to_model_range
from .diffusion import GaussianDiffusion
from .model import UNet
from .viz import save_grid


def build(cfg: DDPMConfig, device: torch.device | str = "cpu") -> tuple[UNet, GaussianDiffusion]:
    return UNet(cfg.model).to(device), GaussianDiffusion.from_config(cfg.diffusion).to(device)


@torch.no_grad()
def sample_grid(model: UNet, diffusion: GaussianDiffusion, n: int, steps: int, seed: int, device) -> torch.Tensor:
    """DDIM samples from a fixed seed (its own generator: the training RNG stream is untouched)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (n, model.config.in_channels, model.config.image_size, model.config.image_size)
    x, _ = diffusion.ddim_sample_loop(model, shape, min(steps, diffusion.num_timesteps), generator=generator, device=device)
    return x


@torch.no_grad()
def validation_loss(model, diffusion: GaussianDiffusion, x0: torch.Tensor, seed: int, batch_size: int = 256) -> float:
    """L_simple (eq. 14, unweighted) on a fixed set of images, timesteps and noise: comparable across evaluations, and
    across runs whatever their training loss (Min-SNR weights, an added L_vlb term)."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    total = 0.0
    for i in range(0, x0.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        _, terms = diffusion.training_loss(model, x0[sl], t[sl].to(x0.device), noise[sl].to(x0.device))
        total += terms["mse"].sum().item()
    return total / x0.shape[0]


def train(cfg: DDPMConfig) -> dict:
    """Train (or resume) in cfg.train.out_dir; returns the final metrics."""
    tc = cfg.train
    with Trainer(tc, cfg, name="dali_ddpm", frozen=("model", "diffusion")) as trainer:
        device = trainer.device
        images, _ = load_images(cfg.data.dataset, "train", cfg.model.image_size, cfg.model.in_channels)
        valid, _ = load_images(cfg.data.dataset, "valid", cfg.model.image_size, cfg.model.in_channels)
        valid_x0 = to_model_range(valid[: tc.eval_size]).to(device)
        model, diffusion = build(cfg, device)
        ema = EMA(model, tc.ema_decay, warmup=tc.ema_warmup)
        if trainer.is_main:
            print(
                f"dali-ddpm train: {count_parameters(model):,} parameters, {images.shape[0]} {cfg.data.dataset} images, device {device}, "
                f"threads {torch.get_num_threads()}, start step {trainer.start_step}",
                flush=True,
            )

        def batch(step: int, micro: int) -> torch.Tensor:
            x0 = to_model_range(images[trainer.batch_indices(images.shape[0], step, micro)]).to(device)
            if cfg.data.random_flip:
                flip = torch.rand(x0.shape[0], device=device) < 0.5
                x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
            return x0

        def loss(model: UNet, x0: torch.Tensor) -> tuple[torch.Tensor, dict]:
            value, _ = diffusion.training_loss(model, x0)  # L_simple at a random t per image (Algorithm 1)
            return value, {}

        def evaluate(model: UNet, step: int) -> dict[str, float]:
            metrics = {"loss": validation_loss(model, diffusion, valid_x0, tc.seed)}
            with ema.applied_to(model):
                metrics["loss_ema"] = validation_loss(model, diffusion, valid_x0, tc.seed)
                if trainer.is_main and step % tc.sample_every == 0:
                    save_grid(
                        sample_grid(model, diffusion, tc.sample_n, tc.sample_steps, tc.seed, device),
                        trainer.out_dir / f"samples_step_{step:08d}.png",
                    )
            return metrics

        result = trainer.fit(
            model,
            loss=loss,
            batch=batch,
            evaluate=evaluate,
            ema=ema,
            schedule=WarmupConstantSchedule(tc.lr, tc.warmup_steps),
            count=lambda x0: x0.shape[0],
            unit="samples",
            extra={"n_params": count_parameters(model)},
            plots={"loss.png": ("train/loss", "valid/loss_ema")},
        )
        if trainer.trained_steps and trainer.is_main:
            with ema.applied_to(model):
                model.eval()
                save_grid(sample_grid(model, diffusion, tc.sample_n, tc.sample_steps, tc.seed, device), trainer.out_dir / "samples.png")
            print(
                f"dali-ddpm train: stopped at step {result['step']} after {result['minutes']:.1f} min; run dir {trainer.out_dir}",
                flush=True,
            )
    return result
