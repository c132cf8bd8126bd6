"""`x-llama train` under torchrun with FSDP2 (2 CPU processes, gloo): trains, gathers a full checkpoint, loads."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from x_llama import load_pretrained

from .conftest import tiny_train_args


def test_fsdp_run_writes_a_loadable_checkpoint(tmp_path, tokenizer_path):
    out = tmp_path / "fsdp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "x_llama.cli"]
    command += [*tiny_train_args(tokenizer_path, out), "--train.fsdp", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AXON_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    model, tokenizer, config = load_pretrained(out)
    assert config.n_layers == 1 and tokenizer is not None
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fsdp_shards_every_block_and_matches_one_process(tmp_path):
    """2 FSDP ranks hold <= 0.6x the parameter + gradient + optimizer-state bytes of 2 DDP ranks; while the first of
    4 blocks runs, the other blocks stay sharded (each block is its own FSDP unit: sharding only the root would
    gather all four); and the ranks train to the losses of one process on the whole batch."""
    import json
    from pathlib import Path

    worker = Path(__file__).with_name("_fsdp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AXON_THREADS": "1"}
    single = subprocess.run([sys.executable, str(worker), "single", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    for mode in ("ddp", "fsdp"):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker), mode, str(tmp_path)]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    runs = {mode: json.loads((tmp_path / f"{mode}.json").read_text()) for mode in ("single", "ddp", "fsdp")}
    total = {mode: sum(runs[mode]["bytes"][k] for k in ("params", "grads", "optimizer")) for mode in runs}
    assert total["ddp"] == total["single"]  # DDP replicates everything
    assert total["fsdp"] <= 0.6 * total["ddp"], runs
    blocks = {mode: runs[mode]["bytes"]["blocks_while_first_runs"] for mode in ("ddp", "fsdp")}
    assert blocks["fsdp"] <= 0.7 * blocks["ddp"], blocks  # one whole block + three half ones = 0.625
    for mode in ("ddp", "fsdp"):
        torch.testing.assert_close(torch.tensor(runs[mode]["losses"]), torch.tensor(runs["single"]["losses"]), rtol=1e-5, atol=1e-5)
