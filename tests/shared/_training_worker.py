"""Run under torchrun (2 ranks) by test_training.py: the toy run of toy_run.py, or one weighted step."""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from toy_run import DATA, fit_toy, toy_config, toy_model

from axon_shared.errors import Interrupted
from axon_shared.training import Trainer


def weighted(out: Path) -> None:
    """One step, 2 micro-batches per rank of 1, 5, 2 and 8 rows; loss = sum of squared errors, weight = rows."""
    cfg = toy_config(out / "run", grad_accum=2, steps=1, warmup_steps=0, lr=1e6, eps=1e6, beta1=0.0, beta2=0.0, grad_clip=0.0).replace(
        model={"dropout": 0.0}
    )
    slices = {(0, 0): slice(0, 1), (1, 0): slice(1, 6), (0, 1): slice(6, 8), (1, 1): slice(8, 16)}
    torch.manual_seed(0)
    before = [p.detach().clone() for p in toy_model(cfg.model).parameters()]
    with Trainer(cfg.train, cfg, name="toy") as trainer:
        rank = trainer.ctx.rank
        model = toy_model(cfg.model)
        trainer.fit(
            model,
            loss=lambda m, rows: ((m(rows[:, :4]) - rows[:, 4:]).pow(2).sum(), {}),
            batch=lambda step, micro: DATA[slices[(rank, micro)]],
            weight=lambda rows: rows.shape[0],
        )
        if rank == 0:
            save_file(
                {str(i): (p.detach() - b).contiguous() for i, (p, b) in enumerate(zip(model.parameters(), before))},
                out / "delta.safetensors",
            )


def toy(out: Path, signal_at: int | None) -> None:
    rank = int(__import__("os").environ["RANK"])
    try:
        result, _, _ = fit_toy(toy_config(out), signal_at=signal_at, signal_rank=1)
        stopped_at, code = result["step"], 0
    except Interrupted as stop:
        stopped_at, code = stop.step, stop.exit_code
        print(stop, file=sys.stderr)
    (out / f"rank{rank}.json").write_text(json.dumps({"stopped_at": stopped_at}))
    # a rank that exits non-zero makes torchrun kill the others: wait (at most 60 s) until both ranks have written
    deadline = time.monotonic() + 60
    while not all((out / f"rank{r}.json").exists() for r in range(2)) and time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit(code)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["weighted", "toy"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--signal_at", type=int)
    args = parser.parse_args()
    weighted(args.out) if args.mode == "weighted" else toy(args.out, args.signal_at)
