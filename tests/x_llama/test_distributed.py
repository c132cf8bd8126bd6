"""`x-llama train` under torchrun with FSDP2 (2 CPU processes, gloo): trains, gathers a full checkpoint, loads."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from x_llama import load_pretrained


def test_fsdp_run_writes_a_loadable_checkpoint(tmp_path, tokenizer_path):
    out = tmp_path / "fsdp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "x_llama.cli", "train",
        "--preset", "tiny", "--model.n_layers", "1", "--data.seq_len", "16", "--data.batch_size", "4",
        "--data.tokenizer", str(tokenizer_path), "--data.max_train_chars", "100000", "--data.max_valid_chars", "20000",
        "--train.max_steps", "2", "--train.eval_batches", "1", "--train.progress", "false", "--train.fsdp", "true",
        "--train.out_dir", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AXON_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    model, tokenizer, config = load_pretrained(out)
    assert config.n_layers == 1 and tokenizer is not None
    assert all(torch.isfinite(p).all() for p in model.parameters())
