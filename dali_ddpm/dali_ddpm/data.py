"""Image data for DDPM: uint8 grey images from axon_shared.data, centred on a square canvas, scaled to [-1, 1].

The paper scales 8-bit pixels linearly to [-1, 1] (section 3.3), so x0 lives on 256 evenly spaced levels; the
discrete decoder L_0 relies on that. Fashion-MNIST and MNIST are 28x28 and are padded with background (0) to 32x32
so that three resolution levels (32, 16, 8) divide evenly. A model smaller than the images gets them shrunk first by
the smallest integer factor that fits, averaging each factor x factor block (28x28 -> 14x14 for a 16x16 model, the
demo's MNIST) and rounding back to 8 bits, so x0 stays on the 256 levels.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from axon_shared.data import load_split

from .config import DATASETS


def load_images(dataset: str, split: str, image_size: int, channels: int = 1) -> tuple[Tensor, Tensor]:
    """(uint8 (N, C, S, S), int64 labels (N,)). Grey images are repeated over C channels (e.g. the cifar10 preset)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; dali_ddpm trains on {list(DATASETS)}")
    data = load_split(dataset, split)
    images = torch.from_numpy(data["images"])  # (N, H, W) uint8
    labels = torch.from_numpy(data["labels"]).long()
    return pad_to(shrink_to_fit(images, image_size), image_size)[:, None].expand(-1, channels, -1, -1).contiguous(), labels


def shrink_to_fit(images: Tensor, size: int) -> Tensor:
    """(N, H, W) uint8 -> (N, H/f, W/f) uint8 with f the smallest integer factor for which H/f, W/f <= size (f = 1:
    unchanged): the mean of each f x f block, rounded. H and W must be multiples of f."""
    _, height, width = images.shape
    factor = -(-max(height, width) // size)  # ceil
    if factor == 1:
        return images
    if height % factor or width % factor:
        raise ValueError(
            f"images are {height}x{width}: shrinking them into image_size={size} needs a factor of {factor}, which does not "
            f"divide both sides; use image_size >= {max(height, width)} (no shrinking) or one for which "
            f"ceil({max(height, width)} / image_size) divides {height} and {width}"
        )
    blocks = rearrange(images.float(), "n (h fh) (w fw) -> n h w (fh fw)", fh=factor, fw=factor)
    return blocks.mean(-1).round().to(torch.uint8)


def pad_to(images: Tensor, size: int) -> Tensor:
    """Centre (N, H, W) images on a (N, size, size) canvas of zeros."""
    n, height, width = images.shape
    if height > size or width > size:
        raise ValueError(f"images are {height}x{width}, larger than the model's image_size={size}; raise --model.image_size")
    top, left = (size - height) // 2, (size - width) // 2
    out = torch.zeros(n, size, size, dtype=images.dtype)
    out[:, top : top + height, left : left + width] = images
    return out


def to_model_range(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """float [-1, 1] -> uint8 [0, 255] (rounded, clamped)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
