"""`x-llama demo`: a short real pretraining run on en-text, then REPORT.md (a Markdown fragment for `make demo`,
image links relative to runs/demo) with the metrics table, the loss curve and samples."""

from __future__ import annotations

import time
from pathlib import Path

from axon_shared.metrics import read_metrics

from .config import DemoConfig, TrainConfig


def demo_config(cfg: DemoConfig) -> TrainConfig:
    return TrainConfig.from_preset("demo", train={"out_dir": str(cfg.out_dir), "max_minutes": cfg.max_minutes})


def run_demo(cfg: DemoConfig, train=None) -> Path:
    """`train` (default x_llama.train.train) is a parameter so tests can stand a few steps in for the 3 minutes."""
    from .train import train as default_train

    out_dir = Path(cfg.out_dir)
    start = time.time()
    train_cfg = demo_config(cfg)
    run_dir = (train or default_train)(train_cfg)
    seconds = time.time() - start
    rows = read_metrics(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "train/loss" in r]
    val_rows = [r for r in rows if "valid/ppl" in r]
    model = train_cfg.model
    lines = [
        "## Llama 2: Open Foundation and Fine-Tuned Chat Models (x_llama)",
        "",
        f"Pretraining a {model.num_parameters() / 1e6:.2f}M-parameter Llama 2 (dim {model.dim}, {model.n_layers} layers, "
        f"{model.n_heads} query / {model.kv_heads} kv heads) on en-text for {seconds / 60:.1f} minutes (`x-llama demo`).",
        "",
        "| step | tokens | train loss | valid perplexity | tokens/s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for val in val_rows:
        row = max((r for r in train_rows if r["step"] <= val["step"]), key=lambda r: r["step"], default=None)
        if row is not None:
            lines.append(
                f"| {val['step']} | {row['tokens']:,} | {row['train/loss']:.3f} | {val['valid/ppl']:.1f} | {row['tokens_per_s']:.0f} |"
            )
    lines += [
        "",
        f"Validation perplexity per token of a {model.vocab_size}-piece BPE vocabulary (fixed windows of the held-out en-text "
        "documents). The full 25-minute run and the benchmarks are in x_llama/README.md.",
        "",
        f"![loss]({out_dir.name}/loss.png)",
        "",
        "Samples (temperature 0.8, top-k 50):",
        "",
    ]
    samples = run_dir / "samples.md"
    if samples.exists():
        lines += ["> " + line if line else ">" for line in samples.read_text().strip().splitlines()]
    (out_dir / "REPORT.md").write_text("\n".join(lines) + "\n")
    print(out_dir / "REPORT.md")
    return out_dir / "REPORT.md"
