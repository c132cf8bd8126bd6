"""The three networks of RLHF, all x_llama models (Touvron et al. 2023):

- the policy pi and the frozen reference/SFT policy: `x_llama.Llama` itself (logits over the vocabulary);
- the reward model r(x, y): the Llama backbone (final RMSNorm output, `Llama.hidden_states`) plus a scalar head,
  read at the last non-pad token (InstructGPT section 3.5: "a scalar reward" on prompt + response);
- the value model V(s_t): the same architecture, read at every position, initialised from the reward model
  (InstructGPT section 3.5: "the value function is initialized from the RM").

Plus saving/loading of these models as one safetensors file (axon_shared.checkpoint) with the LlamaConfig in it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from axon_shared.checkpoint import load_checkpoint, run_checkpoints, save_checkpoint
from x_llama import Llama, LlamaConfig

from .data import Batch


class ScalarHeadModel(nn.Module):
    """Llama backbone + Linear(dim, 1). `forward` -> per-position scalars (B, T); `score` -> (B,) at the last real token."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.backbone = Llama(config)
        self.head = nn.Linear(config.dim, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (config.dim + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy: Llama) -> ScalarHeadModel:
        model = cls(policy.config)
        model.backbone.load_state_dict(policy.state_dict())
        return model

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.backbone.hidden_states(tokens, attention_mask=attention_mask)  # (B, T, dim)
        return self.head(h).squeeze(-1).float()  # (B, T)

    def score(self, tokens: Tensor, attention_mask: Tensor) -> Tensor:
        """r(x, y): the head read at each row's last real token (the EOS when the completion has one). (B,)"""
        values = self(tokens, attention_mask)
        return values.gather(1, last_index(attention_mask)[:, None]).squeeze(1)


def last_index(mask: Tensor) -> Tensor:
    """Index of the last 1 in each row of a (B, T) 0/1 mask."""
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).max(1).values.clamp(min=0)


# ------------------------------------------------------------------------------------------------ forward helpers


def policy_logits(policy: Llama, batch: Batch) -> Tensor:
    """Logits that predict the completion tokens: (B, C, V), row t predicts batch.completion_labels[:, t]."""
    P = batch.prompt_len
    logits = policy(batch.tokens[:, :-1], attention_mask=batch.attention_mask[:, :-1])  # (B, P+C-1, V)
    return logits[:, P - 1 :]


def policy_values(value_model: ScalarHeadModel, batch: Batch) -> Tensor:
    """V(s_t) for each completion token t, read where the policy's logits for t are read: (B, C)."""
    P = batch.prompt_len
    return value_model(batch.tokens[:, :-1], batch.attention_mask[:, :-1])[:, P - 1 :]


# ------------------------------------------------------------------------------------------------ save / load


def save_model(
    path: str | Path,
    model: nn.Module,
    kind: str,
    tokenizer_path: str | Path | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a stage's final model `<name>.safetensors` (kind = policy | reward | value), its metrics as
    `<name>_metrics.json` and the tokenizer next to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    save_checkpoint(path, model=model, config={"kind": kind, "model": config}, metrics=metrics, extra=extra, rng=False)
    if tokenizer_path is not None:
        target = path.parent / "tokenizer.model"
        if Path(tokenizer_path).resolve() != target.resolve():
            shutil.copyfile(tokenizer_path, target)
    if metrics is not None:
        (path.parent / f"{path.stem}_metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"wrote {path} ({metrics})")
    return path


def already_trained(final: Path, stage: str) -> bool:
    """True, and says so, when a stage's final model exists: the stage is skipped, so a pipeline run again resumes
    at the first unfinished stage."""
    if final.exists():
        print(f"{stage}: {final} exists, skipping (delete it to retrain)")
    return final.exists()


def load_policy(path: str | Path) -> Llama:
    """A policy saved by `save_model` (a stage's run dir holding policy.safetensors, or the file)."""
    _, (file,) = run_checkpoints(path, name=None if Path(path).is_file() else "policy.safetensors")
    ckpt = load_checkpoint(file)
    model = Llama(ckpt.model_config(LlamaConfig))
    ckpt.restore(model, rng=False)
    return model


def load_scalar_model(path: str | Path, name: str = "reward.safetensors") -> ScalarHeadModel:
    _, (file,) = run_checkpoints(path, name=None if Path(path).is_file() else name)
    ckpt = load_checkpoint(file)
    model = ScalarHeadModel(ckpt.model_config(LlamaConfig))
    ckpt.restore(model, rng=False)
    return model


def tokenizer_of(path: str | Path):
    from axon_shared.tokenizer import load_tokenizer

    path = Path(path)
    return load_tokenizer(path / "tokenizer.model" if path.is_dir() else path.parent / "tokenizer.model")
