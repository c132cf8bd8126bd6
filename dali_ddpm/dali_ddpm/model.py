"""The DDPM UNet eps_theta(x_t, t) (Ho et al. 2020, section 4 and appendix B).

A PixelCNN++-style UNet: Wide-ResNet blocks with GroupNorm and swish, the timestep added to every block as a
sinusoidal embedding (Transformer-style, `axon_shared.sinusoidal_embedding(layout="concat", freq_shift=1)`),
single-head self-attention at chosen resolutions (16x16 for CIFAR-10), and output convolutions initialised to
zero so that every block starts as the identity and the network starts by predicting 0.

    x (B, C, H, W) -> conv_in -> [level i: num_res_blocks x (ResBlock [+ Attn]), Downsample] -> mid: Res, Attn, Res
      -> [level i reversed: (num_res_blocks + 1) x (concat skip, ResBlock [+ Attn]), Upsample] -> GN, swish, conv_out
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from axon_shared import Dropout, attention, sinusoidal_embedding

from .config import UNetConfig


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """h = conv(dropout(swish(GN(conv(swish(GN(x))) + W swish(temb))))); out = skip(x) + h."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.dropout = Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()  # "NIN" shortcut

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:  # x (B, c_in, H, W), temb (B, temb_dim)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h  # (B, c_out, H, W)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, residual: x + proj(softmax(q k^T / sqrt(C)) v)."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.qkv = nn.Linear(channels, 3 * channels)  # a 1x1 convolution on (B, H*W, C) tokens
        self.proj = _zero(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")  # the H*W positions as tokens
        q, k, v = rearrange(self.qkv(tokens), "b n (three c) -> three b 1 n c", three=3)  # (B, 1, HW, C) each: one head
        h = rearrange(attention(q, k, v), "b 1 n c -> b n c")
        return x + rearrange(self.proj(h), "b (h w) c -> b c h w", h=x.shape[2])


class Downsample(nn.Module):
    """3x3 convolution with stride 2 and TensorFlow 'SAME' padding (pad right/bottom by 1): (H, W) -> (H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution: (H, W) -> (2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: res blocks, optional attention after each, optional resampler at the end."""

    def __init__(self, blocks: list[ResBlock], attn: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)
        self.resample = resample


class UNet(nn.Module):
    """eps_theta(x_t, t): (B, C, S, S) float images in about [-1, 1] and (B,) integer timesteps -> (B, C, S, S)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch, groups, eps = cfg.ch, cfg.num_groups, cfg.norm_eps
        temb_dim = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        def attn_or_id(size: int, width: int) -> nn.Module:
            return AttnBlock(width, groups, eps) if size in cfg.attn_resolutions else nn.Identity()

        levels = len(cfg.ch_mult)
        skip_widths, width, size = [ch], ch, cfg.image_size
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(width, ch * mult, temb_dim, cfg.dropout, groups, eps))
                width = ch * mult
                attn.append(attn_or_id(size, width))
                skip_widths.append(width)
            down = Downsample(width) if i < levels - 1 else None
            if down is not None:
                skip_widths.append(width)
                size //= 2
            self.down.append(Level(blocks, attn, down))

        self.mid_block1 = ResBlock(width, width, temb_dim, cfg.dropout, groups, eps)
        self.mid_attn = AttnBlock(width, groups, eps)
        self.mid_block2 = ResBlock(width, width, temb_dim, cfg.dropout, groups, eps)

        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(width + skip_widths.pop(), ch * mult, temb_dim, cfg.dropout, groups, eps))
                width = ch * mult
                attn.append(attn_or_id(size, width))
            up = Upsample(width) if i > 0 else None
            if up is not None:
                size *= 2
            self.up.append(Level(blocks, attn, up))
        assert not skip_widths

        self.norm_out = nn.GroupNorm(groups, width, eps=eps)
        self.conv_out = _zero(nn.Conv2d(width, cfg.in_channels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] != cfg.image_size or x.shape[3] != cfg.image_size:
            raise ValueError(
                f"UNet expects images (B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), got {tuple(x.shape)}; "
                "pad or resize the images, or build the UNet with matching in_channels/image_size"
            )
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must be (B,) = ({x.shape[0]},) integer timesteps, got shape {tuple(t.shape)}")
        temb = self.temb(sinusoidal_embedding(t, cfg.ch, layout="concat", freq_shift=1).to(x.dtype))  # (B, 4ch)

        hs = [self.conv_in(x)]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attn):
                hs.append(attn(block(hs[-1], temb)))
            if level.resample is not None:
                hs.append(level.resample(hs[-1]))
        h = self.mid_block2(self.mid_attn(self.mid_block1(hs[-1], temb)), temb)
        for level in self.up:
            for block, attn in zip(level.blocks, level.attn):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), temb))
            if level.resample is not None:
                h = level.resample(h)
        assert not hs
        return self.conv_out(F.silu(self.norm_out(h)))
