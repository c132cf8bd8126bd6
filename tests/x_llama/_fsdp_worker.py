"""Run by test_distributed.py: 3 steps of a tiny Llama through the one training loop, as one process, as 2 DDP
ranks or as 2 FSDP ranks (each half of the same global batch); writes the losses and, before the second optimizer
step, this rank's bytes of parameters + gradients + optimizer state (local shards under FSDP)."""

import json
import os
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from axon_shared.training import Trainer
from x_llama import Llama, TrainConfig, lm_loss


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.ndim == 0:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def main(mode: str, out: Path) -> None:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cfg = TrainConfig.from_preset(
        "tiny",
        model={"n_layers": 4, "max_seq_len": 32},
        data={"seq_len": 16},
        train={
            "out_dir": str(out / mode),
            "steps": 3,
            "batch_size": 8 // world,
            "fsdp": mode == "fsdp",
            "lr": 1e-2,
            "warmup_steps": 0,
            "eval_every": 100,
            "checkpoint_every": 100,
            "log_every": 1,
            "progress": False,
        },
    )
    tokens = torch.randint(0, cfg.model.vocab_size, (3, 8, 17), generator=torch.Generator().manual_seed(0))  # (step, row, T+1)
    measured = {}

    def measure(optimizer, args, kwargs):
        if measured.get("calls", 0) == 1:  # the second step: Adam's state exists
            params = [p for group in optimizer.param_groups for p in group["params"]]
            state = [t for p in params for t in optimizer.state[p].values()]
            measured.update(params=local_bytes(params), grads=local_bytes(p.grad for p in params), optimizer=local_bytes(state))
        measured["calls"] = measured.get("calls", 0) + 1

    register_optimizer_step_pre_hook(measure)
    with Trainer(cfg.train, cfg, name="fsdp-test") as trainer:
        model = Llama(cfg.model)

        def while_first_block_runs(module, args):  # bytes of every block's parameters as they are at that moment
            if "blocks_while_first_runs" not in measured:
                measured["blocks_while_first_runs"] = local_bytes(p for layer in model.layers for p in layer.parameters())

        model.layers[0].register_forward_pre_hook(while_first_block_runs)
        rows = slice(rank * cfg.train.batch_size, (rank + 1) * cfg.train.batch_size)
        result = trainer.fit(
            model,
            loss=lambda m, b: (lm_loss(m(b[:, :-1]), b[:, 1:]), {}),
            batch=lambda step, micro: tokens[step, rows],
            blocks=model.layers,
        )
    if rank == 0:
        losses = [
            row["train/loss"] for row in map(json.loads, (out / mode / "metrics.jsonl").read_text().splitlines()) if "train/loss" in row
        ]
        (out / f"{mode}.json").write_text(json.dumps({"losses": losses, "bytes": measured, "step": result["step"]}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
