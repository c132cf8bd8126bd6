"""Loading a trained run (optionally averaging its last checkpoints, section 6.1), translating text, sacreBLEU."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import sacrebleu
import torch
from axon_shared.checkpoint import CheckpointError, average_checkpoints, load_checkpoint, load_model_state
from axon_shared.tokenizer import Tokenizer, load_tokenizer

from .config import TrainConfig
from .data import check_tokenizer, pad
from .decoding import beam_search, greedy_decode
from .model import Transformer

TOKENIZER_FILE = "spm.model"


def checkpoint_files(run_dir: str | Path) -> list[Path]:
    """step_*.safetensors of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.safetensors") if (m := re.fullmatch(r"step_(\d+)\.safetensors", p.name))]
    return [p for _, p in sorted(found)]


def load_model(run_dir: str | Path, checkpoint: str = "", average_last: int = 1, device: str = "cpu") -> tuple[Transformer, Tokenizer, TrainConfig]:
    """The model of a run (eval mode) with its tokenizer and config. checkpoint="" takes the latest;
    average_last=N > 1 loads the element-wise mean of the last N checkpoints instead."""
    run_dir = Path(run_dir)
    if checkpoint:
        paths = [Path(checkpoint)]
    else:
        paths = checkpoint_files(run_dir)
        if not paths:
            raise CheckpointError(f"no checkpoints in {run_dir / 'checkpoints'}; train first: transformer train --train.out_dir {run_dir}")
        paths = paths[-average_last:]
    ckpt = load_checkpoint(paths[-1])
    config = TrainConfig.from_dict(ckpt.config)
    model = Transformer(config.model)
    state = average_checkpoints(paths) if len(paths) > 1 else ckpt.tensors["model"]
    load_model_state(model, state, source=paths[-1])
    tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE)
    check_tokenizer(tokenizer, config.model)
    return model.to(device).eval(), tokenizer, config


@dataclass
class Translator:
    model: Transformer
    tokenizer: Tokenizer

    @torch.no_grad()
    def translate(self, texts: list[str], *, beam_size: int = 4, alpha: float = 0.6, batch_size: int = 64) -> list[str]:
        """Translate sentences, batched by length. Empty (or whitespace-only) input gives "" without running the
        model; a source longer than the model's max_len is truncated to its first max_len - 1 tokens (+ eos),
        with a warning; unknown characters become the unk token."""
        cfg = self.model.config
        device = self.model.embedding.weight.device
        encoded = self.tokenizer.encode_batch([t.strip() for t in texts])
        too_long = sum(len(ids) + 1 > cfg.max_len for ids in encoded)
        if too_long:
            warnings.warn(f"{too_long} input(s) longer than max_len={cfg.max_len} tokens were truncated", stacklevel=3)
        sources = [ids[: cfg.max_len - 1] + [cfg.eos_id] for ids in encoded]
        outputs = [""] * len(texts)
        todo = sorted((i for i, ids in enumerate(encoded) if ids), key=lambda i: len(sources[i]))
        for start in range(0, len(todo), batch_size):
            rows = todo[start : start + batch_size]
            src = pad([sources[i] for i in rows], cfg.pad_id).to(device)
            if beam_size == 1:
                hyps = greedy_decode(self.model, src)
            else:
                hyps = [h[0].tokens if h else [] for h in beam_search(self.model, src, beam_size=beam_size, alpha=alpha)]
            for i, tokens in zip(rows, hyps):
                outputs[i] = self.tokenizer.decode(tokens)
        return outputs


def bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
    """Corpus BLEU (Papineni et al. 2002) on detokenized text with sacreBLEU's default 13a tokenization.
    Returns (score, signature)."""
    metric = sacrebleu.metrics.BLEU()
    score = metric.corpus_score(hypotheses, [references])
    return score.score, str(metric.get_signature())
