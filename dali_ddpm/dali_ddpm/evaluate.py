"""`dali-ddpm evaluate`: sample quality (FID-C vs its floor, predicted-class histogram), bits/dim, sampler timings."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from axon_shared import pick_device

from .config import EvaluateConfig
from .data import load_images, to_model_range
from .fid import features, fid_c, get_classifier, predict
from .sample import draw, load_run
from .viz import save_grid


def class_histogram(logits: torch.Tensor, n_classes: int = 10) -> list[float]:
    """Fraction of images the classifier puts in each class (mode coverage: ~0.1 each for a balanced dataset)."""
    return (torch.bincount(logits.argmax(1), minlength=n_classes).double() / logits.shape[0]).tolist()


def evaluate(cfg: EvaluateConfig) -> dict:
    device = pick_device(cfg.device)
    run_dir = Path(cfg.run_dir)
    run_cfg, model, diffusion, step = load_run(run_dir, cfg.checkpoint, use_ema=cfg.use_ema, device=device)
    tag = "" if cfg.use_ema else "_raw"
    dataset, size, channels = run_cfg.data.dataset, run_cfg.model.image_size, run_cfg.model.in_channels
    result: dict = {
        "run_dir": str(run_dir),
        "step": step,
        "dataset": dataset,
        "n_samples": cfg.n_samples,
        "threads": torch.get_num_threads(),
        "weights": "ema" if cfg.use_ema else "raw",
    }

    start = time.time()
    classifier, accuracy = get_classifier(dataset, size, channels, epochs=cfg.classifier_epochs, seed=cfg.seed, device=device)
    result["classifier_test_accuracy"] = round(accuracy, 4)
    train, _ = load_images(dataset, "train", size, channels)
    test, _ = load_images(dataset, "test", size, channels)
    pick = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(cfg.seed))[: cfg.ref_size]
    ref = features(classifier, to_model_range(train[pick]), device)
    test_x = to_model_range(test)
    test_pick = torch.randperm(test.shape[0], generator=torch.Generator().manual_seed(cfg.seed + 1))
    floors: dict[int, float] = {}

    def floor(n: int) -> float:
        """FID-C of n held-out test images against the train statistics: the best a sampler can do with n samples."""
        if n not in floors:
            floors[n] = round(fid_c(features(classifier, test_x[test_pick[:n]], device), ref), 3)
        return floors[n]

    result["fidc_floor"] = floor(cfg.n_samples)
    result["fidc_floor_full_test"] = round(fid_c(features(classifier, test_x, device), ref), 3)
    result["test_class_histogram"] = [round(v, 3) for v in class_histogram(predict(classifier, test_x[test_pick[: cfg.n_samples]], device))]
    result["classifier_seconds"] = round(time.time() - start, 1)
    print(json.dumps(result), flush=True)

    for sampler in cfg.samplers:
        n_steps = diffusion.num_timesteps if sampler == "ddpm" else cfg.ddim_steps
        name = "ddpm" if sampler == "ddpm" else f"ddim{n_steps}" + (f"_eta{cfg.ddim_eta:g}" if cfg.ddim_eta else "")
        n = cfg.ddpm_samples if sampler == "ddpm" and cfg.ddpm_samples else cfg.n_samples
        x, _, seconds = draw(
            model,
            diffusion,
            n,
            sampler=sampler,
            steps=n_steps,
            eta=cfg.ddim_eta,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            device=device,
            progress=True,
        )
        save_grid(x[:64], run_dir / f"eval_samples_{name}{tag}.png")
        result[name] = {
            "steps": n_steps,
            "n_samples": n,
            "fidc": round(fid_c(features(classifier, x, device), ref), 3),
            "fidc_floor": floor(n),
            "class_histogram": [round(v, 3) for v in class_histogram(predict(classifier, x, device))],
            "seconds": round(seconds, 1),
            "seconds_per_image": round(seconds / n, 3),
        }
        print(json.dumps({name: result[name]}), flush=True)

    start = time.time()
    bpd_x = test_x[test_pick[: cfg.bpd_images]].to(device)
    terms = diffusion.bits_per_dim(model, bpd_x, n_timesteps=cfg.bpd_timesteps, generator=torch.Generator().manual_seed(cfg.seed))
    total = terms["total"]
    # the padded border is modelled too; a 32x32 VLB divided by 28*28 bounds the 28x28 images' bits/dim from above
    original = size * size  # dims actually modelled
    result["bits_per_dim"] = {
        "per_modelled_dim": round(total.mean().item(), 4),
        "stderr": round(total.std().item() / math.sqrt(total.numel()), 4) if total.numel() > 1 else None,  # none from one image
        "prior": round(terms["prior"].mean().item(), 6),
        "decoder": round(terms["decoder"].mean().item(), 4),
        "kl_sum": round(terms["kl"].mean().item(), 4),
        "n_images": cfg.bpd_images,
        "timesteps": f"{min(cfg.bpd_timesteps, diffusion.num_timesteps)} stratified + 20 exact"
        if cfg.bpd_timesteps < diffusion.num_timesteps - 21
        else "all",
        "seconds": round(time.time() - start, 1),
    }
    if dataset in ("fashion-mnist", "mnist-5k") and size == 32:
        result["bits_per_dim"]["per_28x28_dim_upper_bound"] = round(total.mean().item() * original / (28 * 28), 4)
    out = Path(cfg.out) if cfg.out else run_dir / f"eval{tag}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"bits_per_dim": result["bits_per_dim"]}), flush=True)
    print(f"wrote {out}")
    return result
