"""`transformer train | translate | evaluate | average | demo` (one CLI shape for all Axon packages)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from axon_shared.checkpoint import average_checkpoints, load_checkpoint, save_checkpoint
from axon_shared.cli import Command, build_cli

from .config import AverageConfig, DemoConfig, EvaluateConfig, TrainConfig, TranslateConfig
from .train import set_threads, train


def translate(cfg: TranslateConfig) -> list[str]:
    from .inference import Translator, load_model

    set_threads()
    from axon_shared.distributed import pick_device

    model, tokenizer, _ = load_model(cfg.run_dir, cfg.checkpoint, cfg.average_last, str(pick_device(cfg.device)))
    texts = list(cfg.text) or [line.rstrip("\n") for line in sys.stdin]
    outputs = Translator(model, tokenizer).translate(texts, beam_size=cfg.beam_size, alpha=cfg.alpha, batch_size=cfg.batch_size)
    for line in outputs:
        print(line)
    return outputs


def evaluate(cfg: EvaluateConfig) -> dict:
    """sacreBLEU of greedy and beam decoding on a held-out split."""
    from axon_shared.distributed import pick_device

    from .data import load_pairs
    from .inference import Translator, bleu, load_model

    set_threads()
    model, tokenizer, train_cfg = load_model(cfg.run_dir, cfg.checkpoint, cfg.average_last, str(pick_device(cfg.device)))
    pairs = load_pairs(train_cfg.data, cfg.split)
    if cfg.limit:
        pairs = pairs[: cfg.limit]
    sources, references = [s for s, _ in pairs], [t for _, t in pairs]
    translator = Translator(model, tokenizer)
    result: dict = {"split": cfg.split, "sentences": len(pairs), "corpora": list(train_cfg.data.corpora),
                    "direction": f"{train_cfg.data.src_lang}->{train_cfg.data.tgt_lang}", "average_last": cfg.average_last}
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


def average(cfg: AverageConfig) -> Path:
    """Average the last N checkpoints of a run into one checkpoint (model weights only)."""
    from .inference import checkpoint_files

    paths = checkpoint_files(cfg.run_dir)[-cfg.last :]
    if not paths:
        raise SystemExit(f"transformer average: no checkpoints in {cfg.run_dir}/checkpoints")
    last = load_checkpoint(paths[-1])
    from .config import TrainConfig as _TC
    from .model import Transformer

    model = Transformer(_TC.from_dict(last.config).model)
    model.load_state_dict(average_checkpoints(paths))
    out = Path(cfg.out) if cfg.out else Path(cfg.run_dir) / "averaged.safetensors"
    save_checkpoint(out, model=model, step=last.step, config=last.config, extra={"averaged": [p.name for p in paths]}, rng=False)
    print(f"averaged {len(paths)} checkpoints ({', '.join(p.name for p in paths)}) -> {out}")
    return out


def demo(cfg: DemoConfig) -> Path:
    from .demo import run_demo

    return run_demo(cfg)


COMMANDS = {
    "train": Command(train, TrainConfig, "train on de-en-libreoffice (en->de; corpora and direction selectable)", default_preset="cpu"),
    "translate": Command(translate, TranslateConfig, "translate text arguments or stdin lines (beam search)"),
    "evaluate": Command(evaluate, EvaluateConfig, "sacreBLEU on the held-out test split, greedy and beam"),
    "average": Command(average, AverageConfig, "average the last N checkpoints of a run"),
    "demo": Command(demo, DemoConfig, "a few minutes of training on real data; writes REPORT.md"),
}

_main = build_cli("transformer", COMMANDS, "transformer: Attention Is All You Need (Vaswani et al. 2017), en->de")


def main(argv: Sequence[str] | None = None):
    """Like the shared CLI, plus positional text for `translate`: transformer translate --run_dir R "Hello." "Bye."."""
    from_console = argv is None  # as a console script, return None: sys.exit(result) would print the result
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "translate":
        options, texts, i = [], [], 1
        while i < len(argv):
            arg = argv[i]
            if arg.startswith("--"):
                options.append(arg)
                if "=" not in arg and i + 1 < len(argv) and arg not in ("--help", "-h"):
                    options.append(argv[i + 1])
                    i += 1
            elif arg == "-h":
                options.append(arg)
            else:
                texts.append(arg)
            i += 1
        if texts:
            options += ["--text", json.dumps(texts)]
        argv = ["translate", *options]
    result = _main(argv)
    return None if from_console else result


if __name__ == "__main__":
    main()
