"""Shared fixtures: a tiny random x_llama 'pretrained run' with a SentencePiece tokenizer trained on movie snippets."""

from pathlib import Path

import pytest
import torch

from axon_shared.checkpoint import checkpoint_path, save_checkpoint
from axon_shared.tokenizer import train_sentencepiece
from x_llama import Llama, LlamaConfig

TINY = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, multiple_of=16, max_seq_len=96)


def tiny_llama(vocab_size: int, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(vocab_size=vocab_size, **TINY))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """An x_llama run dir (checkpoints/step_*.safetensors + tokenizer.model) that x_llama.load_pretrained reads."""
    from instructgpt_rlhf.data import movie_snippets

    run = tmp_path_factory.mktemp("base")
    texts = [r["text"] for r in movie_snippets("train")[:3000]]
    tokenizer = train_sentencepiece(texts, run / "tokenizer.model", vocab_size=300, num_threads=1)
    model = tiny_llama(tokenizer.vocab_size)
    save_checkpoint(
        checkpoint_path(run / "checkpoints", 1),
        model=model,
        step=1,
        config={"model": model.config.to_dict()},
        extra={"tokenizer": "tokenizer.model"},
    )
    return run
