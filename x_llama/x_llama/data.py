"""Pretraining data: en-text documents -> a SentencePiece BPE tokenizer (bos 1, eos 2, unk 0, no pad) -> one
stream of ids (each document as [BOS] ids [EOS]) -> random windows of seq_len + 1 tokens.

Batches are a pure function of (seed, rank, step, micro-step): resuming at step k draws exactly the windows an
uninterrupted run would, with no data-loader state to checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from axon_shared.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece

from .config import DataConfig


def load_documents(dataset: str, split: str) -> list[str]:
    from axon_shared.data import load_split

    return [record["text"] for record in load_split(dataset, split)]


def proportional_prefix(documents: list[str], max_chars: int | None) -> list[str]:
    """Cap the corpus at max_chars by keeping the same leading fraction of every document (so every source and
    book stays represented)."""
    total = sum(len(d) for d in documents)
    if max_chars is None or total <= max_chars:
        return documents
    fraction = max_chars / total
    return [d[: max(1, int(len(d) * fraction))] for d in documents]


def tokenizer_sentences(documents: list[str], max_chars: int, piece: int = 1000) -> Iterator[str]:
    """Lines of at most ~`piece` characters (SentencePiece skips sentences longer than 4192 bytes)."""
    for document in proportional_prefix(documents, max_chars):
        for line in document.splitlines():
            words, size, chunk = line.split(), 0, []
            for word in words:
                chunk.append(word)
                size += len(word) + 1
                if size >= piece:
                    yield " ".join(chunk)
                    chunk, size = [], 0
            if chunk:
                yield " ".join(chunk)


def build_tokenizer(config: DataConfig, vocab_size: int, out_dir: Path) -> Tokenizer:
    """The run's tokenizer: `config.tokenizer` if given, else <out_dir>/tokenizer.model (trained once)."""
    if config.tokenizer:
        tokenizer = load_tokenizer(config.tokenizer)
    elif (out_dir / "tokenizer.model").is_file():
        tokenizer = load_tokenizer(out_dir / "tokenizer.model")
    else:
        documents = load_documents(config.dataset, "train")
        tokenizer = train_sentencepiece(
            tokenizer_sentences(documents, config.tokenizer_chars),
            out_dir / "tokenizer.model",
            vocab_size=vocab_size,
            bos_id=1,
            eos_id=2,
            unk_id=0,
            pad_id=-1,
            num_threads=1,
        )
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size={vocab_size}; "
            "set --model.vocab_size to the tokenizer's size or train a new tokenizer (remove tokenizer.model)"
        )
    return tokenizer


def token_stream(config: DataConfig, tokenizer: Tokenizer, split: str, out_dir: Path) -> Tensor:
    """All documents of a split as one int64 stream [BOS] doc [EOS] [BOS] doc [EOS] ...; cached in out_dir."""
    max_chars = config.max_train_chars if split == "train" else config.max_valid_chars
    cache = out_dir / f"tokens_{split}.npy"
    stamp = out_dir / f"tokens_{split}.json"
    key = {"dataset": config.dataset, "max_chars": max_chars, "tokenizer_pieces": tokenizer.vocab_size, "tokenizer": str(tokenizer.path)}
    if cache.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == key:
        return torch.from_numpy(np.load(cache).astype(np.int64))
    documents = proportional_prefix(load_documents(config.dataset, split), max_chars)
    ids = tokenizer.encode_batch(documents, bos=True, eos=True)
    stream = np.concatenate([np.asarray(row, dtype=np.int32) for row in ids])
    np.save(cache, stream)
    stamp.write_text(json.dumps(key))
    return torch.from_numpy(stream.astype(np.int64))


def batch_at(stream: Tensor, batch_size: int, seq_len: int, seed: int) -> tuple[Tensor, Tensor]:
    """(inputs, targets), each (batch_size, seq_len): random windows of the stream, targets shifted by one."""
    if stream.numel() < seq_len + 2:
        raise ValueError(f"token stream of {stream.numel()} tokens is shorter than seq_len + 1 = {seq_len + 1}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,), generator=generator)
    windows = stream[starts[:, None] + torch.arange(seq_len + 1)]  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """A distinct, reproducible seed for every (rank, step, micro-step)."""
    return int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def share_token_caches(run_dir: Path, out_dir: Path, tokenizer: str) -> None:
    """Copy the tokenizer next to the new run and hard-link the original run's token caches into it when they were
    made with the same tokenizer file (token_stream checks the stamp again, and re-encodes if it differs)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / "tokenizer.model").exists():
        shutil.copyfile(tokenizer, out_dir / "tokenizer.model")
    for split in ("train", "valid", "test"):
        stamp, cache = run_dir / f"tokens_{split}.json", run_dir / f"tokens_{split}.npy"
        if not (stamp.is_file() and cache.is_file()) or (out_dir / cache.name).exists():
            continue
        if Path(json.loads(stamp.read_text()).get("tokenizer", "")).resolve() != Path(tokenizer).resolve():
            continue
        stamped = json.loads(stamp.read_text()) | {"tokenizer": tokenizer}
        try:
            os.link(cache, out_dir / cache.name)
        except OSError:
            shutil.copyfile(cache, out_dir / cache.name)
        (out_dir / stamp.name).write_text(json.dumps(stamped))
