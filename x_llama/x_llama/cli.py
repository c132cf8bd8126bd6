"""`x-llama train | generate | evaluate | demo` (flags: --preset NAME --config FILE --section.field VALUE)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from axon_shared.cli import Command, build_cli

from .config import DemoConfig, EvaluateConfig, GenerateConfig, TrainConfig
from .generation import stream_generate
from .train import evaluate_loss, load_pretrained, set_threads, train


def run_generate(cfg: GenerateConfig) -> str:
    """Stream a continuation of --prompt (or stdin) to stdout; returns the generated text."""
    set_threads()
    model, tokenizer, _ = load_pretrained(cfg.checkpoint)
    if tokenizer is None:
        raise SystemExit(f"x-llama generate: no tokenizer.model next to {cfg.checkpoint}; cannot encode the prompt")
    prompt = cfg.prompt if cfg.prompt is not None else sys.stdin.read()
    ids = tokenizer.encode(prompt.strip(), bos=True)
    budget = min(cfg.max_new_tokens, model.config.max_seq_len - len(ids))
    if budget < 1:
        raise SystemExit(f"x-llama generate: the prompt has {len(ids)} tokens, no room left in max_seq_len={model.config.max_seq_len}")
    generator = torch.Generator().manual_seed(cfg.seed)
    prefix = tokenizer.decode(ids)
    sys.stdout.write(prefix)
    new: list[int] = []
    shown = prefix
    for token in stream_generate(
        model, ids, budget, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, eos_id=tokenizer.eos_id,
        use_cache=cfg.use_cache, generator=generator,
    ):
        new.append(token)
        text = tokenizer.decode(ids + new)  # decode prompt + continuation: pieces join with the right spaces
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")
    return shown[len(prefix):]


def run_evaluate(cfg: EvaluateConfig) -> dict[str, float]:
    """Perplexity exp(mean NLL) of a checkpoint on a split of en-text (fixed random windows)."""
    from .data import token_stream

    set_threads()
    model, tokenizer, _ = load_pretrained(cfg.checkpoint)
    run_dir = Path(cfg.checkpoint) if Path(cfg.checkpoint).is_dir() else Path(cfg.checkpoint).parent.parent
    train_cfg = TrainConfig.from_dict(__import__("json").loads((run_dir / "config.json").read_text()))
    stream = token_stream(train_cfg.data, tokenizer, cfg.split, run_dir)
    loss = evaluate_loss(model, stream, cfg.batches, cfg.batch_size, train_cfg.data.seq_len, seed=cfg.seed)
    result = {"split": cfg.split, "loss": loss, "perplexity": math.exp(loss), "tokens": cfg.batches * cfg.batch_size * train_cfg.data.seq_len}
    print(f"{cfg.split}: loss {loss:.4f}  perplexity {math.exp(loss):.2f}  ({result['tokens']} tokens)")
    return result


def run_demo(cfg: DemoConfig) -> Path:
    """A short real pretraining run on en-text, then REPORT.md with the metrics table, curves and samples."""
    out_dir = Path(cfg.out_dir)
    start = time.time()
    train_cfg = TrainConfig.from_preset("demo", train={"out_dir": str(out_dir), "max_minutes": cfg.max_minutes})
    run_dir = train(train_cfg)
    seconds = time.time() - start
    rows = [r for r in _read_jsonl(run_dir / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_ppl" in r]
    link = out_dir.name
    lines = [
        "## Llama 2: Open Foundation and Fine-Tuned Chat Models (x_llama)",
        "",
        f"Pretraining a {train_cfg.model.num_parameters() / 1e6:.2f}M-parameter Llama 2 (dim {train_cfg.model.dim}, "
        f"{train_cfg.model.n_layers} layers, {train_cfg.model.n_heads} query / {train_cfg.model.kv_heads} kv heads) "
        f"on en-text for {seconds / 60:.1f} minutes (`x-llama demo`).",
        "",
        "| step | tokens | train loss | valid perplexity | tokens/s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for val in val_rows:
        train_row = max((r for r in train_rows if r["step"] <= val["step"]), key=lambda r: r["step"], default=None)
        if train_row is not None:
            lines.append(
                f"| {val['step']} | {train_row['tokens']:,} | {train_row['loss']:.3f} | {val['val_ppl']:.1f} | {train_row['tokens_per_s']:.0f} |"
            )
    lines += [
        "",
        f"Validation perplexity per token of a {train_cfg.model.vocab_size}-piece BPE vocabulary (fixed windows of the "
        "held-out en-text documents). The full 25-minute run and the benchmarks are in x_llama/README.md.",
    ]
    lines += ["", f"![loss]({link}/loss.png)", "", "Samples (temperature 0.8, top-k 50):", ""]
    samples = run_dir / "samples.md"
    if samples.exists():
        lines += ["> " + line if line else ">" for line in samples.read_text().strip().splitlines()]
    (out_dir / "REPORT.md").write_text("\n".join(lines) + "\n")
    print(out_dir / "REPORT.md")
    return out_dir / "REPORT.md"


def _read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


_main = build_cli(
    "x-llama",
    {
        "train": Command(train, TrainConfig, "pretrain Llama 2 on en-text (resumes from the latest checkpoint in --train.out_dir)", default_preset="cpu"),
        "generate": Command(run_generate, GenerateConfig, "stream a continuation of --prompt (or stdin) from a checkpoint"),
        "evaluate": Command(run_evaluate, EvaluateConfig, "perplexity of a checkpoint on en-text"),
        "demo": Command(run_demo, DemoConfig, "<= 4 minute pretraining run writing runs/demo/x_llama/REPORT.md"),
    },
    description="x_llama: Llama 2 from scratch (RoPE, GQA, KV cache)",
)



def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the command, exit 0 (the command's return value is for Python callers)."""
    _main(argv)
    return 0


if __name__ == "__main__":
    main()
