"""Weight conversion between our UNet and diffusers' `UNet2DModel` (same layout, renamed tensors).

Used by the parity test and the benchmark, and lets users with internet load the paper's released CIFAR-10
weights (`google/ddpm-cifar10-32`, converted by diffusers from the original TensorFlow checkpoint):

    from diffusers import UNet2DModel
    theirs = UNet2DModel.from_pretrained("google/ddpm-cifar10-32")
    ours = UNet(UNetConfig.from_preset("cifar10")); ours.load_state_dict(from_diffusers_state_dict(theirs.state_dict()))
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from .config import UNetConfig

_RES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2", "skip": "conv_shortcut"}


def diffusers_unet_kwargs(cfg: UNetConfig) -> dict[str, Any]:
    """Keyword arguments for `diffusers.UNet2DModel` giving the same architecture as `UNet(cfg)`."""
    levels = len(cfg.ch_mult)
    sizes = [cfg.image_size // 2**i for i in range(levels)]
    return dict(
        sample_size=cfg.image_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if s in cfg.attn_resolutions else "DownBlock2D" for s in sizes),
        up_block_types=tuple("AttnUpBlock2D" if s in cfg.attn_resolutions else "UpBlock2D" for s in reversed(sizes)),
        attention_head_dim=None,  # one head of full width, as in the paper
        norm_num_groups=cfg.num_groups,
        norm_eps=cfg.norm_eps,
        downsample_padding=0,  # TF 'SAME' padding of the stride-2 conv
        flip_sin_to_cos=False,
        freq_shift=1,
        time_embedding_type="positional",
        act_fn="silu",
        dropout=cfg.dropout,
    )


def _rename(name: str) -> list[str]:
    """Our tensor name -> the diffusers name(s) (qkv maps to three tensors)."""
    rules = [
        (r"temb\.0\.(.*)", r"time_embedding.linear_1.\1"),
        (r"temb\.2\.(.*)", r"time_embedding.linear_2.\1"),
        (r"(down|up)\.(\d+)\.resample\.conv\.(.*)", None),
        (r"(down|up)\.(\d+)\.blocks\.(\d+)\.(\w+)\.(.*)", None),
        (r"(down|up)\.(\d+)\.attn\.(\d+)\.(\w+)\.(.*)", None),
        (r"mid_block([12])\.(\w+)\.(.*)", None),
        (r"mid_attn\.(\w+)\.(.*)", None),
        (r"norm_out\.(.*)", r"conv_norm_out.\1"),
        (r"(conv_in|conv_out)\.(.*)", r"\1.\2"),
    ]
    attn = {"norm": ["group_norm"], "qkv": ["to_q", "to_k", "to_v"], "proj": ["to_out.0"]}
    for pattern, template in rules:
        m = re.fullmatch(pattern, name)
        if not m:
            continue
        if template is not None:
            return [m.expand(template)]
        g = m.groups()
        if ".resample." in name:
            kind = "downsamplers" if g[0] == "down" else "upsamplers"
            return [f"{g[0]}_blocks.{g[1]}.{kind}.0.conv.{g[2]}"]
        if ".blocks." in name:
            return [f"{g[0]}_blocks.{g[1]}.resnets.{g[2]}.{_RES[g[3]]}.{g[4]}"]
        if ".attn." in name:
            return [f"{g[0]}_blocks.{g[1]}.attentions.{g[2]}.{a}.{g[4]}" for a in attn[g[3]]]
        if name.startswith("mid_block"):
            return [f"mid_block.resnets.{int(g[0]) - 1}.{_RES[g[1]]}.{g[2]}"]
        return [f"mid_block.attentions.0.{a}.{g[1]}" for a in attn[g[0]]]
    raise KeyError(f"no diffusers name for {name}")


def to_diffusers_state_dict(ours: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, tensor in ours.items():
        targets = _rename(name)
        for target, part in zip(targets, tensor.chunk(len(targets), dim=0)):
            out[target] = part.clone()
    return out


def from_diffusers_state_dict(theirs: dict[str, Tensor], cfg: UNetConfig | None = None) -> dict[str, Tensor]:
    """The inverse of `to_diffusers_state_dict` (needs our names: built from a fresh UNet's state dict)."""
    from .model import UNet

    template = UNet(cfg or UNetConfig()).state_dict()
    out = {}
    for name in template:
        sources = _rename(name)
        missing = [s for s in sources if s not in theirs]
        if missing:
            raise KeyError(f"diffusers state dict lacks {missing}; is the UNetConfig the same layout?")
        out[name] = torch.cat([theirs[s] for s in sources], dim=0) if len(sources) > 1 else theirs[sources[0]].clone()
    return out
