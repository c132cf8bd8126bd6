"""Why did DDPM-1000 score FID-C 26.7 at N = 50, below the floor of real images (60.9)? FID at small N, measured.

FID estimated from N images is biased upwards, by roughly k / N (Chong & Forsyth 2020, "Effectively Unbiased FID
and Inception Score and where to find them", section 3), and k is not a constant of the metric: it grows with how
spread out the N images' features are. This script measures, for the real test images and for a trained run's
DDPM-1000 and DDIM-50 samples:

- FID-C at N = 50, 100, 200, 500 and 1,000, over many random subsets (mean and standard deviation);
- the straight-line fit FID_N = FID_inf + k / N over those means (N >= 100, above the 64 feature dimensions), which
  extrapolates to infinitely many images;
- tr(Sigma) and ||mu - mu_ref||^2 of each source's features, against the training-set reference.

The samples are drawn once and kept (<out>/samples_*.safetensors), so a rerun only scores. DDPM samples come in sets
of 50 with seeds 0, 1, ... (seed 0 is the README's set of 50); DDIM's first 200 (seed 0, batch 200) are the
README's 200.

    python dali_ddpm/experiments/fid_bias.py --run_dir runs/dali_ddpm/cpu --out runs/dali_ddpm/fid_bias
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dali_ddpm.data import load_images, to_model_range
from dali_ddpm.fid import features, fid_c, gaussian_stats, get_classifier
from dali_ddpm.sample import draw, load_run


def sample_pool(args, kind: str) -> torch.Tensor:
    """DDPM: args.ddpm_sets sets of 50 (seed = set index); DDIM: args.ddim_n samples from seed 0 in batches of 200."""
    out = Path(args.out)
    _, model, diffusion, step = load_run(args.run_dir, use_ema=True)
    chunks = []
    plan = [(f"ddpm_seed{s}", s, 50) for s in range(args.ddpm_sets)] if kind == "ddpm" else [("ddim50_seed0", 0, args.ddim_n)]
    for name, seed, n in plan:
        path = out / f"samples_{name}.safetensors"
        if not path.is_file():
            start = time.time()
            steps = diffusion.num_timesteps if kind == "ddpm" else 50
            x, _, _ = draw(model, diffusion, n, sampler=kind, steps=steps, batch_size=200, seed=seed, progress=True)
            save_file({"x": x.contiguous()}, str(path))
            print(f"{name}: {n} samples in {time.time() - start:.0f} s (step {step})", flush=True)
        chunks.append(load_file(str(path))["x"])
    return torch.cat(chunks)


def fid_curve(feats: torch.Tensor, ref: torch.Tensor, sizes: list[int], repeats: int, seed: int) -> dict:
    """FID-C of `repeats` random subsets of each size (without replacement within a subset)."""
    generator = torch.Generator().manual_seed(seed)
    curve = {}
    for n in sizes:
        if n > feats.shape[0]:
            continue
        reps = 1 if n == feats.shape[0] else repeats
        values = torch.tensor([fid_c(feats[torch.randperm(feats.shape[0], generator=generator)[:n]], ref) for _ in range(reps)])
        low, high = torch.quantile(values.double(), torch.tensor([0.1, 0.9], dtype=torch.float64)).tolist()
        curve[n] = {
            "mean": values.mean().item(),
            "std": values.std().item() if reps > 1 else 0.0,
            "min": values.min().item(),
            "p10": low,
            "p90": high,
            "max": values.max().item(),
            "repeats": reps,
        }
    return curve


def extrapolate(curve: dict, min_n: int) -> dict:
    """Least-squares FID_N = FID_inf + k / N over the subset means with N >= min_n (Chong & Forsyth 2020). The line
    holds only for N well above the feature dimension: below it the covariance estimate is singular."""
    kept = {n: v for n, v in curve.items() if n >= min_n}
    n = torch.tensor([float(k) for k in kept], dtype=torch.float64)
    y = torch.tensor([v["mean"] for v in kept.values()], dtype=torch.float64)
    design = torch.stack([torch.ones_like(n), 1 / n], 1)
    fid_inf, slope = torch.linalg.lstsq(design, y[:, None]).solution.squeeze(1).tolist()
    return {"fid_inf": fid_inf, "k": slope, "fit_sizes": list(kept)}


def plot(result: dict, names: list[str], path: Path) -> None:
    """FID-C against N (log scale) with one standard deviation over subsets, and each source's fitted k / N line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in names:
        curve = result[name]["curve"]
        sizes = [int(n) for n in curve]
        line = ax.errorbar(
            sizes, [v["mean"] for v in curve.values()], yerr=[v["std"] for v in curve.values()], marker="o", capsize=3, label=name
        )
        grid = torch.linspace(min(sizes), max(sizes), 100)
        fit = result[name]["fid_inf"] + result[name]["k"] / grid
        ax.plot(grid[fit > 0], fit[fit > 0], ls=":", color=line[0].get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N (images per FID-C estimate)")
    ax.set_ylabel("FID-C against 10,000 training images")
    ax.set_title("mean ± sd over random subsets; dotted: FID_inf + k / N", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run_dir", default="runs/dali_ddpm/cpu")
    parser.add_argument("--out", default="runs/dali_ddpm/fid_bias")
    parser.add_argument("--ddpm_sets", type=int, default=6, help="sets of 50 DDPM-1000 samples (about 150 s each on 2 threads)")
    parser.add_argument("--ddim_n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=50, help="random subsets per N")
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 300, 500, 1000])
    parser.add_argument("--fit_min", type=int, default=100, help="smallest N in the 1/N fit")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)

    run_cfg, *_ = load_run(args.run_dir)
    dataset, size, channels = run_cfg.data.dataset, run_cfg.model.image_size, run_cfg.model.in_channels
    classifier, accuracy = get_classifier(dataset, size, channels, epochs=2, seed=0)
    train, _ = load_images(dataset, "train", size, channels)
    test, _ = load_images(dataset, "test", size, channels)
    pick = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))[:10_000]  # as `evaluate`
    ref = features(classifier, to_model_range(train[pick]))
    test_pick = torch.randperm(test.shape[0], generator=torch.Generator().manual_seed(1))  # as `evaluate`'s floor
    sources = {
        "test": features(classifier, to_model_range(test)),
        "ddpm1000": features(classifier, sample_pool(args, "ddpm")),
        "ddim50": features(classifier, sample_pool(args, "ddim")),
    }
    mu_ref, sigma_ref = gaussian_stats(ref)
    result = {
        "run_dir": args.run_dir,
        "feature_dim": ref.shape[1],
        "classifier_test_accuracy": accuracy,
        "reference": {"n": ref.shape[0], "trace_sigma": torch.trace(sigma_ref).item()},
        # the README's single draws: evaluate's floor (first 50 of the seed-1 permutation) and the first 50 / 200 samples
        "readme_draws": {
            "floor_n50": fid_c(sources["test"][test_pick[:50]], ref),
            "floor_n200": fid_c(sources["test"][test_pick[:200]], ref),
            "ddpm1000_n50_seed0": fid_c(sources["ddpm1000"][:50], ref),
            "ddim50_n200_seed0": fid_c(sources["ddim50"][:200], ref),
        },
    }
    for name, feats in sources.items():
        mu, sigma = gaussian_stats(feats)
        curve = fid_curve(feats, ref, args.sizes, args.repeats, seed=0)
        result[name] = {
            "pool": feats.shape[0],
            "trace_sigma": torch.trace(sigma).item(),
            "mean_shift_sq": (mu - mu_ref).pow(2).sum().item(),
            "curve": curve,
            **extrapolate(curve, args.fit_min),
        }
        print(json.dumps({name: result[name]}), flush=True)
    (Path(args.out) / "fid_bias.json").write_text(json.dumps(result, indent=2))
    plot(result, list(sources), Path(args.out) / "fid_bias.png")
    print(json.dumps(result["readme_draws"]))
    print(f"wrote {Path(args.out) / 'fid_bias.json'}")


if __name__ == "__main__":
    main()
