"""Shared fixtures for the x_llama tests: tiny configs and one small en-text tokenizer per session."""

from __future__ import annotations

import pytest
import torch

from x_llama import Llama, LlamaConfig


@pytest.fixture
def tiny_config() -> LlamaConfig:
    return LlamaConfig.from_preset("tiny", vocab_size=97, max_seq_len=64)


@pytest.fixture
def tiny_model(tiny_config) -> Llama:
    torch.manual_seed(0)
    return Llama(tiny_config).eval()


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    """A 512-piece SentencePiece BPE tokenizer trained on 300k characters of en-text."""
    from x_llama.config import DataConfig
    from x_llama.data import build_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(DataConfig(tokenizer_chars=300_000), 512, out)
    return out / "tokenizer.model"


def tiny_train_args(tokenizer_path, out_dir) -> list[str]:
    """`x-llama train` arguments for a 2-step, 1-layer run on the session tokenizer."""
    return [
        "train", "--preset", "tiny", "--model.n_layers", "1", "--data.seq_len", "16", "--train.batch_size", "4",
        "--data.tokenizer", str(tokenizer_path), "--data.max_train_chars", "100000", "--data.max_valid_chars", "20000",
        "--train.steps", "2", "--train.eval_batches", "1", "--train.progress", "false", "--train.out_dir", str(out_dir),
    ]  # fmt: skip
