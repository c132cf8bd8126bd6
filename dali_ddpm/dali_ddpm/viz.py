"""PNG figures: sample grids, denoising trajectories, schedules."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from .data import to_uint8


def grid(images: Tensor, nrow: int | None = None, pad: int = 2) -> Tensor:
    """(N, C, H, W) float in [-1, 1] -> (C, rows*(H+pad)+pad, nrow*(W+pad)+pad) uint8 mosaic."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    pixels = to_uint8(images.detach().cpu())
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = pixels[i]
    return canvas


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, scale: int = 2) -> Path:
    from PIL import Image

    mosaic = grid(images, nrow)
    array = mosaic[0].numpy() if mosaic.shape[0] == 1 else mosaic.permute(1, 2, 0).numpy()
    image = Image.fromarray(array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def save_trajectory(trajectory: list[tuple[int, Tensor]], path: str | Path, n_images: int = 8, columns: int = 11) -> Path:
    """Rows = images, columns = x_t at evenly chosen captured t, from pure noise (left) to x_0 (right)."""
    picks = (
        [trajectory[round(i * (len(trajectory) - 1) / (columns - 1))] for i in range(columns)] if len(trajectory) >= columns else trajectory
    )
    frames = torch.stack([x[:n_images] for _, x in picks], dim=1)  # (n, columns, C, H, W)
    path = save_grid(frames.flatten(0, 1).clamp(-1, 1), path, nrow=len(picks))
    return path
