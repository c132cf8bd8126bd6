"""FID-C: the Fréchet distance between Gaussian fits of features of a small classifier trained on the same data.

FID (Heusel et al. 2017) uses Inception-v3 features of ImageNet-sized colour images; no such network is available
offline and Inception features mean little on 28x28 grey images. FID-C is the same formula in the 64-d feature
space of `FeatureClassifier`, a small CNN this package trains on the dataset itself. Its numbers are NOT comparable
with Inception FID (or with FID-C of another classifier); compare them with the floor: FID-C of as many held-out
test images against the train statistics (what a perfect generator would get with this sample size).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from axon_shared import load_checkpoint, load_model_state, save_checkpoint

from .data import load_images, to_model_range


class FeatureClassifier(nn.Module):
    """(B, C, 32, 32) in [-1, 1] -> 10 logits; `features` gives the 64-d penultimate activations."""

    def __init__(self, in_channels: int = 1, n_classes: int = 10, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(64 * 16, feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(feature_dim, n_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def cache_dir() -> Path:
    return Path(os.environ.get("AXON_DATA") or Path.home() / ".cache" / "axon") / "dali_ddpm"


def get_classifier(
    dataset: str, image_size: int, channels: int = 1, *, epochs: int = 2, seed: int = 0, device="cpu", verbose: bool = True
) -> tuple[FeatureClassifier, float]:
    """The FID-C classifier for a dataset, trained once and cached under the Axon cache (never in the repo).
    Returns (classifier in eval mode, test accuracy)."""
    path = cache_dir() / f"fidc_{dataset}_{image_size}px_{channels}ch_e{epochs}_s{seed}.safetensors"
    model = FeatureClassifier(channels).to(device)
    if path.is_file():
        ckpt = load_checkpoint(path)
        load_model_state(model, ckpt.tensors["model"], source=path)
        return model.eval(), ckpt.metrics["test_accuracy"]
    images, labels = load_images(dataset, "train", image_size, channels)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = FeatureClassifier(channels).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    epochs = max(epochs, -(-300 * 128 // images.shape[0]))  # at least ~300 steps on small datasets
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        for i in range(0, images.shape[0], 128):
            idx = order[i : i + 128]
            loss = F.cross_entropy(model(to_model_range(images[idx]).to(device)), labels[idx].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    test, test_labels = load_images(dataset, "test", image_size, channels)
    accuracy = (predict(model, to_model_range(test), device).argmax(1) == test_labels).float().mean().item()
    save_checkpoint(path, model=model, metrics={"test_accuracy": accuracy}, rng=False, extra={"dataset": dataset})
    if verbose:
        print(f"FID-C classifier for {dataset}: {epochs} epochs, test accuracy {accuracy:.3f}, cached at {path}", flush=True)
    return model, accuracy


@torch.no_grad()
def predict(model: FeatureClassifier, x: Tensor, device="cpu", batch_size: int = 500) -> Tensor:
    return torch.cat([model(x[i : i + batch_size].to(device)).cpu() for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def features(model: FeatureClassifier, x: Tensor, device="cpu", batch_size: int = 500) -> Tensor:
    return torch.cat([model.features(x[i : i + batch_size].to(device)).cpu() for i in range(0, x.shape[0], batch_size)])


def gaussian_stats(feats: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) in float64."""
    feats = feats.double()
    return feats.mean(0), torch.cov(feats.T)


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)); tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))."""
    evals, evecs = torch.linalg.eigh(sigma1)
    root1 = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    middle = root1 @ sigma2 @ root1
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * tr_sqrt)


def fid_c(feats_a: Tensor, feats_b: Tensor) -> float:
    return frechet_distance(*gaussian_stats(feats_a), *gaussian_stats(feats_b))
