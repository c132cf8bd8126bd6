"""GQA uptraining (Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
Checkpoints", section 2.1): a multi-head checkpoint becomes a grouped-query (or multi-query) one in two steps.

1. Conversion. The H query heads are split into G groups of H/G consecutive heads; each group gets one key and
   one value head. Its projection is the mean of the group's original key (value) projections:

       W_k^(g) = (G/H) * sum_{i in group g} W_k^(i),     W_v^(g) likewise          (paper Figure 1, "mean pooling")

   The paper's ablation (section 3.3, Figure 4) compares mean pooling with keeping the group's first head and with
   a random initialisation; `convert_kv_heads` has all three. Query and output projections are unchanged.
   RoPE rotates every head by the same angles, so it commutes with the mean: RoPE(mean_i W_k^(i) x) =
   mean_i RoPE(W_k^(i) x), and mean pooling averages the rotated keys the heads would have produced.

2. Uptraining. The converted model is pretrained on for a fraction alpha of the original pretraining steps with
   the same recipe (paper: alpha = 0.05, section 2.1 and Figure 5). `uptrain` does it with the one training loop
   and writes an ordinary run; its step-0 evaluation is the converted model before uptraining (alpha = 0).

The grouping is the one `axon_shared.layers.attention` uses: query head h reads kv head h // (H/G), so the group
of kv head g is the consecutive query heads g*H/G ... (g+1)*H/G - 1, the layout of Llama 2 70B and transformers'
`repeat_kv`. Converting a GQA model to fewer kv heads pools consecutive kv heads in the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from einops import rearrange

from axon_shared.checkpoint import load_checkpoint, run_checkpoints
from axon_shared.config import ConfigError

from .config import LlamaConfig, TrainConfig, UptrainConfig
from .data import share_token_caches
from .model import Llama


@torch.no_grad()
def pool_heads(weight: torch.Tensor, n_heads: int, n_groups: int, method: str, generator: torch.Generator | None = None, std: float = 0.02):
    """A key or value projection (n_heads * d_head, dim) -> (n_groups * d_head, dim): each group of n_heads / n_groups
    consecutive heads becomes one head (its mean, its first head, or a fresh N(0, std) draw)."""
    grouped = rearrange(weight, "(g m d) dim -> g m d dim", g=n_groups, m=n_heads // n_groups)  # (G, heads per group, d, dim)
    if method == "mean":
        pooled = grouped.mean(dim=1)
    elif method == "first":
        pooled = grouped[:, 0]
    elif method == "random":
        pooled = torch.empty_like(grouped[:, 0]).normal_(0.0, std, generator=generator)
    else:
        raise ValueError(f"method={method!r}: must be one of {list(UptrainConfig.METHODS)}")
    return rearrange(pooled, "g d dim -> (g d) dim").contiguous()


def convert_kv_heads(model: Llama, n_kv_heads: int, method: str = "mean", seed: int = 0) -> Llama:
    """A new Llama with `n_kv_heads` key/value heads built from `model`'s weights (section 2.1): every other tensor
    is copied, and each layer's wk / wv are pooled by `pool_heads`. `model` is left unchanged; the new model is in
    the same mode (train/eval), dtype and device."""
    config: LlamaConfig = model.config
    if config.kv_heads % n_kv_heads:
        raise ValueError(
            f"n_kv_heads={n_kv_heads} must divide the model's {config.kv_heads} kv heads (each new head pools a group of the old ones)"
        )
    new_config = config.replace(n_kv_heads=n_kv_heads)
    weight = model.tok_embeddings.weight
    with torch.device("meta"):
        converted = Llama(new_config)
    converted.to_empty(device=weight.device)
    generator = torch.Generator(device=weight.device).manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            tensor = pool_heads(tensor, config.kv_heads, n_kv_heads, method, generator, config.init_std)
        state[name] = tensor.detach().clone()
    converted.load_state_dict(state)
    converted.rope_cos, converted.rope_sin = converted.rope_tables(weight.device)
    converted.to(weight.dtype)
    converted.activation_checkpointing = model.activation_checkpointing
    return converted.train(model.training)


def uptrain_config(cfg: UptrainConfig) -> tuple[TrainConfig, Path]:
    """The TrainConfig of the uptraining run: the original run's model (with n_kv_heads), data and train sections,
    for round(fraction * steps) steps at a constant learning rate. Also returns the original checkpoint's path."""
    run_dir, (path,) = run_checkpoints(cfg.from_run)
    saved = load_checkpoint(path).config
    if "model" not in saved or "train" not in saved:
        raise ConfigError(f"UptrainConfig.from_run={cfg.from_run!r}: {path} is not an x-llama pretraining checkpoint")
    original = TrainConfig.from_saved(saved)
    steps = max(1, round(cfg.fraction * original.train.steps))
    lr = cfg.lr if cfg.lr is not None else original.train.lr * original.train.min_lr_ratio
    eval_every = cfg.eval_every or max(1, math.ceil(steps / 4))
    tokenizer = original.data.tokenizer or str((run_dir / "tokenizer.model").resolve())
    train_cfg = original.replace(
        model={"n_kv_heads": cfg.n_kv_heads},
        data={"tokenizer": tokenizer},
        train={
            "out_dir": cfg.out_dir,
            "steps": steps,
            "lr": lr,
            "warmup_steps": min(cfg.warmup_steps, steps),
            "min_lr_ratio": 1.0,  # constant after warm-up: the original cosine schedule has ended
            "seed": cfg.seed,
            "eval_every": eval_every,
            "checkpoint_every": eval_every,
            "eval_batches": cfg.eval_batches or original.train.eval_batches,
            "max_minutes": None,
        },
    )
    return train_cfg, path


def uptrain(cfg: UptrainConfig) -> Path:
    """`x-llama uptrain`: convert the run `from_run` to n_kv_heads key/value heads and pretrain on (resumes from the
    latest checkpoint in out_dir if there is one). Returns the run directory."""
    from .train import load_pretrained, train

    train_cfg, path = uptrain_config(cfg)
    model, _, _ = load_pretrained(path)
    converted = convert_kv_heads(model, cfg.n_kv_heads, cfg.method, seed=cfg.seed)
    out_dir = Path(cfg.out_dir)
    share_token_caches(Path(path).parent.parent, out_dir, train_cfg.data.tokenizer)
    (out_dir / "uptrain.json").write_text(json.dumps({"from": str(path), **cfg.to_dict()}, indent=2, sort_keys=True) + "\n")
    return train(train_cfg, initial_state=converted.state_dict())
