"""`transformer demo`: a few minutes of en->de training on LibreOffice help, then BLEU and translations -> REPORT.md."""

from __future__ import annotations

import json
import time
from pathlib import Path

from axon_shared.metrics import read_metrics

from .config import DemoConfig, TrainConfig
from .data import load_pairs
from .inference import Translator, bleu, load_model
from .train import train


def demo_config(cfg: DemoConfig) -> TrainConfig:
    """A narrow model (d_model 128, 2+2 layers, 4k vocabulary) that learns visibly within minutes."""
    return TrainConfig.from_preset(
        "cpu",
        model=dict(vocab_size=4000, d_model=128, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=512, dropout=0.0, max_len=128),
        data=dict(spm_sample=20_000),
        # peak lr 1.06e-3 = 0.15 * (128 * 100)^-0.5; about 120 steps a minute on 2 cores
        train=dict(
            out_dir=cfg.out_dir,
            batch_size=1500,
            max_minutes=cfg.max_minutes,
            warmup_steps=100,
            lr=1.0607e-3,
            eval_every=125,
            checkpoint_every=100_000,
            eval_bleu_sentences=100,
            log_every=10,
        ),
    )


def run_demo(cfg: DemoConfig) -> Path:
    start = time.time()
    out_dir = Path(cfg.out_dir)
    train_cfg = demo_config(cfg)
    train(train_cfg)
    model, tokenizer, _ = load_model(out_dir)
    pairs = load_pairs(train_cfg.data, "test")[: cfg.eval_sentences]
    translator = Translator(model, tokenizer)
    sources, references = [s for s, _ in pairs], [t for _, t in pairs]
    greedy_bleu, signature = bleu(translator.translate(sources, beam_size=1), references)
    examples = translator.translate(sources[:5], beam_size=4)
    rows = [r for r in read_metrics(out_dir / "metrics.jsonl") if "valid/bleu" in r]
    name = out_dir.name
    lines = [
        "## Attention Is All You Need (transformer)",
        "",
        f"A {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter post-norm Transformer trained for "
        f"{cfg.max_minutes:g} minutes on `de-en-libreoffice` (en->de), from scratch including its BPE vocabulary. "
        f"Greedy sacreBLEU on the first {len(pairs)} test sentences: **{greedy_bleu:.1f}** (`{signature}`).",
        "",
        "| step | minutes | valid NLL / token | valid BLEU (greedy, 100 sentences) |",
        "|---:|---:|---:|---:|",
        *[f"| {r['step']} | {r['time'] / 60:.1f} | {r['valid/nll']:.3f} | {r['valid/bleu']:.1f} |" for r in rows],
        "",
        f"![loss]({name}/loss.png) ![bleu]({name}/bleu.png)",
        "",
        "Held-out test sentences (beam 4):",
        "",
        "| English | reference | ours |",
        "|---|---|---|",
        *[
            "| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in row) + " |"
            for row in zip(sources[:5], references[:5], examples)
        ],
        "",
        f"Demo wall time {time.time() - start:.0f} s. The 30-minute `cpu`-preset result (test BLEU 25+) is in `transformer/README.md`.",
        "",
    ]
    report = out_dir / "REPORT.md"
    report.write_text("\n".join(lines))
    (out_dir / "demo.json").write_text(
        json.dumps({"greedy_bleu": greedy_bleu, "signature": signature, "examples": examples}, ensure_ascii=False, indent=2)
    )
    print(report.read_text())
    return report
