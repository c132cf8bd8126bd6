"""`demo`: the whole pipeline at demo scale (x_llama tiny pretraining included), in about 3 minutes on 2 cores;
writes <out_dir>/REPORT.md, a Markdown fragment whose image links are relative to runs/demo."""

from __future__ import annotations

import time
from pathlib import Path

from .config import DemoConfig, PipelineConfig
from .pipeline import run_pipeline


def run_demo(cfg: DemoConfig) -> Path:
    t0 = time.time()
    pipeline = PipelineConfig.from_preset("demo", out_dir=cfg.out_dir, pretrained=cfg.pretrained)
    run_pipeline(pipeline)
    report = Path(cfg.out_dir) / "REPORT.md"
    text = report.read_text()
    note = (
        f"\n_Demo scale (toy model, minutes of CPU: {time.time() - t0:.0f} s in total); "
        "the measured CPU-scale results are in instructgpt_rlhf/README.md._\n"
    )
    report.write_text(text + note)
    print(f"demo: wrote {report}")
    return report
