"""Loading a trained run (optionally averaging its last checkpoints, section 6.1), translating text, sacreBLEU."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import sacrebleu
import torch

from axon_shared.checkpoint import CheckpointError, average_checkpoints, load_checkpoint, load_model_state, run_checkpoints
from axon_shared.tokenizer import Tokenizer, load_tokenizer

from .config import TrainConfig, TransformerConfig
from .data import check_tokenizer, pad
from .decoding import beam_search, greedy_decode
from .model import Transformer

TOKENIZER_FILE = "spm.model"


def load_model(
    run_dir: str | Path, checkpoint: str = "", average_last: int = 1, device: str = "cpu", use_ema: bool = False
) -> tuple[Transformer, Tokenizer, TrainConfig]:
    """The model of a run (eval mode) with its tokenizer and config. checkpoint="" takes the latest;
    average_last=N > 1 loads the element-wise mean of the last N checkpoints instead (section 6.1); use_ema=True
    the exponential moving average of the weights that a run with train.ema_decay > 0 keeps in its checkpoints."""
    run_dir, paths = run_checkpoints(checkpoint or run_dir, last=average_last)
    ckpt = load_checkpoint(paths[-1])
    part = "ema" if use_ema else "model"
    if part not in ckpt.tensors:
        raise CheckpointError(f"{paths[-1]} holds no EMA weights (its run trained with train.ema_decay 0); pass --use_ema false")
    model_config = ckpt.model_config(TransformerConfig)
    config = TrainConfig.from_saved({key: ckpt.config[key] for key in ("model", "data") if key in ckpt.config})
    model = Transformer(model_config)
    state = average_checkpoints(paths, part) if len(paths) > 1 else ckpt.tensors[part]
    load_model_state(model, state, source=paths[-1])
    tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE)
    check_tokenizer(tokenizer, model_config)
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


# ---- the commands ----------------------------------------------------------------------------------------------


def translate_command(cfg) -> list[str]:
    """`transformer translate`: text arguments (or stdin lines) to stdout, one line each."""
    from axon_shared.cli import text_argument
    from axon_shared.distributed import pick_device

    model, tokenizer, _ = load_model(cfg.run_dir, cfg.checkpoint, cfg.average_last, str(pick_device(cfg.device)), cfg.use_ema)
    texts = [text_argument(t) for t in cfg.text] if cfg.text else text_argument(None, "input").splitlines()
    outputs = Translator(model, tokenizer).translate(texts, beam_size=cfg.beam_size, alpha=cfg.alpha, batch_size=cfg.batch_size)
    for line in outputs:
        print(line)
    return outputs


def evaluate_command(cfg) -> dict:
    """`transformer evaluate`: sacreBLEU of greedy and beam decoding on a held-out split."""
    import json
    import time

    from axon_shared.distributed import pick_device

    from .data import load_pairs

    model, tokenizer, train_cfg = load_model(cfg.run_dir, cfg.checkpoint, cfg.average_last, str(pick_device(cfg.device)), cfg.use_ema)
    pairs = load_pairs(train_cfg.data, cfg.split)
    if cfg.limit:
        pairs = pairs[: cfg.limit]
    sources, references = [s for s, _ in pairs], [t for _, t in pairs]
    translator = Translator(model, tokenizer)
    result: dict = {
        "split": cfg.split,
        "sentences": len(pairs),
        "corpora": list(train_cfg.data.corpora),
        "direction": f"{train_cfg.data.src_lang}->{train_cfg.data.tgt_lang}",
        "average_last": cfg.average_last,
        "weights": "ema" if cfg.use_ema else "trained",
    }
    modes = ([("greedy", 1)] if cfg.greedy else []) + ([(f"beam{cfg.beam_size}", cfg.beam_size)] if cfg.beam_size > 1 else [])
    for name, beam in modes:
        start = time.time()
        hyps = translator.translate(sources, beam_size=beam, alpha=cfg.alpha, batch_size=cfg.batch_size)
        score, signature = bleu(hyps, references)
        result[name] = {"bleu": round(score, 2), "seconds": round(time.time() - start, 1), "examples": hyps[:5]}
        result["signature"] = signature
        print(f"{name}: BLEU {score:.2f}  ({len(pairs)} sentences, {time.time() - start:.0f} s)")
    print(f"sacreBLEU signature: {result.get('signature')}")
    out = Path(cfg.out) if cfg.out else Path(cfg.run_dir) / f"eval_{cfg.split}.json"
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return result


def average_command(cfg) -> Path:
    """`transformer average`: one checkpoint holding the mean of the last N checkpoints' weights (section 6.1)."""
    from axon_shared.checkpoint import save_checkpoint

    _, paths = run_checkpoints(cfg.run_dir, last=cfg.last)
    last = load_checkpoint(paths[-1])
    model = Transformer(last.model_config(TransformerConfig))
    model.load_state_dict(average_checkpoints(paths, "ema" if cfg.use_ema else "model"))
    out = Path(cfg.out) if cfg.out else Path(cfg.run_dir) / "averaged.safetensors"
    save_checkpoint(out, model=model, step=last.step, config=last.config, extra={"averaged": [p.name for p in paths]}, rng=False)
    print(f"averaged {len(paths)} checkpoints ({', '.join(p.name for p in paths)}) -> {out}")
    return out
