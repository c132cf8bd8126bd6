"""`dali-ddpm demo`: a few minutes of the cpu preset on Fashion-MNIST, then DDIM samples scored with FID-C.

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
        # a run of ~50-100 steps: short warm-up, and an EMA short enough to follow it (see README, "Results")
        train=dict(
            out_dir=str(out / "run"),
            max_minutes=cfg.max_minutes,
            seed=cfg.seed,
            warmup_steps=10,
            ema_decay=0.9,
            eval_every=20,
            log_every=10,
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
            ddim_steps=50,
            n_samples=cfg.n_samples,
            batch_size=cfg.n_samples,
            bpd_images=16,
            bpd_timesteps=20,
            seed=cfg.seed,
        )
    )
    name = out.name  # image links are relative to the parent (runs/demo)
    plot_metrics(out / "run" / "metrics.jsonl", out / "loss.png", ["train/loss", "valid/loss_ema"], log_y=["train/loss", "valid/loss_ema"])
    (out / "samples.png").write_bytes((out / "run" / "eval_samples_ddim50.png").read_bytes())
    ddim = evaluated["ddim50"]
    bpd = evaluated["bits_per_dim"]
    lines = [
        "## Denoising Diffusion Probabilistic Models (dali_ddpm)",
        "",
        f"The `cpu` UNet ({trained.get('step')} steps, {trained['minutes']:.1f} min, batch {run_cfg.train.batch_size}, warm-up 10, EMA 0.9) on Fashion-MNIST "
        "padded to 32x32, then 50-step DDIM samples from the EMA weights. FID-C is a Fréchet distance in the feature space "
        "of a small classifier trained on Fashion-MNIST (not comparable with Inception FID); its floor is the FID-C of as many "
        "held-out test images. A demo this short does not form garments yet (and 50-step DDIM is the first sampler to fail on "
        "an undertrained network); see dali_ddpm/README.md for the 30-minute run and 1000-step DDPM samples.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| train steps / minutes | {trained.get('step')} / {trained['minutes']:.1f} |",
        f"| final train loss (L_simple) | {trained.get('train/loss', float('nan')):.4f} |",
        f"| valid L_simple (EMA) | {trained.get('valid/loss_ema', float('nan')):.4f} |",
        f"| FID-C, DDIM 50 steps, {ddim['n_samples']} samples | {ddim['fidc']:.2f} |",
        f"| FID-C floor (test vs train, same N) | {ddim['fidc_floor']:.2f} |",
        f"| sampling time per image (DDIM 50) | {ddim['seconds_per_image']:.3f} s |",
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
