"""`dali-ddpm demo`: a few minutes of the cpu UNet on 16x16 MNIST, then stochastic DDIM samples scored with FID-C.

Writes <out_dir>/REPORT.md (a Markdown fragment for `make demo`; image links relative to runs/demo).
"""

from __future__ import annotations

import json
from pathlib import Path

from axon_shared import plot_metrics

from .config import DDPMConfig, DemoConfig, EvaluateConfig
from .evaluate import evaluate
from .train import train


def demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out_dir)
    run_cfg = DDPMConfig.from_preset(
        "cpu",
        model=dict(image_size=cfg.image_size),
        data=dict(dataset=cfg.dataset),
        # a run of ~900 steps: a short warm-up, a higher learning rate than the 30-minute run, and an EMA that follows it
        train=dict(
            out_dir=str(out / "run"),
            max_minutes=cfg.max_minutes,
            seed=cfg.seed,
            lr=1e-3,
            warmup_steps=50,
            ema_decay=0.999,
            eval_every=250,
            log_every=25,
            eval_size=256,
            sample_every=10**9,
            checkpoint_every=10**9,
            sample_n=16,
        ),
    )
    trained = train(run_cfg)
    evaluated = evaluate(
        EvaluateConfig(
            run_dir=str(out / "run"),
            samplers=("ddim",),
            ddim_steps=cfg.ddim_steps,
            ddim_eta=cfg.ddim_eta,
            n_samples=cfg.n_samples,
            batch_size=cfg.n_samples,
            bpd_images=16,
            bpd_timesteps=20,
            seed=cfg.seed,
        )
    )
    name = out.name  # image links are relative to the parent (runs/demo)
    plot_metrics(out / "run" / "metrics.jsonl", out / "loss.png", ["train/loss", "valid/loss_ema"], log_y=["train/loss", "valid/loss_ema"])
    sampler = f"ddim{cfg.ddim_steps}" + (f"_eta{cfg.ddim_eta:g}" if cfg.ddim_eta else "")
    (out / "samples.png").write_bytes((out / "run" / f"eval_samples_{sampler}.png").read_bytes())
    ddim = evaluated[sampler]
    bpd = evaluated["bits_per_dim"]
    lines = [
        "## Denoising Diffusion Probabilistic Models (dali_ddpm)",
        "",
        f"The `cpu` UNet ({trained.get('step')} steps, {trained['minutes']:.1f} min, batch {run_cfg.train.batch_size}, lr "
        f"{run_cfg.train.lr:g}, EMA {run_cfg.train.ema_decay:g}) on {cfg.dataset} shrunk to 14x14 and padded to "
        f"{cfg.image_size}x{cfg.image_size}, with the paper's T = 1000 linear schedule; then {cfg.ddim_steps}-step DDIM samples "
        f"with eta = {cfg.ddim_eta:g} from the EMA weights (eta = 1 is ancestral sampling on a sub-sequence of the 1000 steps; "
        "deterministic DDIM, eta = 0, leaves a network this young with noisy images). FID-C is a Fréchet distance in the "
        "feature space of a small classifier trained on the same data (not comparable with Inception FID); its floor is the "
        "FID-C of as many held-out test images. dali_ddpm/README.md has the 30-minute Fashion-MNIST run at 32x32 and its "
        "1000-step DDPM samples.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| train steps / minutes | {trained.get('step')} / {trained['minutes']:.1f} |",
        f"| final train loss (L_simple) | {trained['train/loss']:.4f} |",
        f"| valid L_simple (EMA weights) | {trained['valid/loss_ema']:.4f} |",
        f"| FID-C, DDIM {cfg.ddim_steps} steps eta {cfg.ddim_eta:g}, {ddim['n_samples']} samples | {ddim['fidc']:.2f} |",
        f"| FID-C floor (test vs train, same N) | {ddim['fidc_floor']:.2f} |",
        f"| sampling time per image | {ddim['seconds_per_image']:.3f} s |",
        f"| bits/dim upper bound (VLB, {bpd['n_images']} test images, estimated) | {bpd['per_modelled_dim']:.2f} |",
        f"| classifier test accuracy | {evaluated['classifier_test_accuracy']:.3f} |",
        "",
        f"![loss]({name}/loss.png)",
        "",
        f"![samples]({name}/samples.png)",
        "",
    ]
    (out / "REPORT.md").write_text("\n".join(lines))
    (out / "demo.json").write_text(json.dumps({"train": trained, "evaluate": evaluated}, indent=2, default=str))
    print(f"wrote {out / 'REPORT.md'}")
    return {"train": trained, "evaluate": evaluated}
