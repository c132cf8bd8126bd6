"""Parallel data: corpora from axon_shared.data, a joint SentencePiece BPE, and token-based length-bucketed batches.

Sequences (section 5.1 batches "by approximate sequence length", ~25k source + 25k target tokens each):
    source  = x_1 .. x_m  eos
    tgt_in  = bos  y_1 .. y_n          (decoder input, teacher forcing)
    tgt_out = y_1 .. y_n  eos          (labels)
all right-padded with pad_id (eos always precedes the padding).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from axon_shared.data import load_split
from axon_shared.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece

from .config import DataConfig, TransformerConfig

Pair = tuple[str, str]


def load_pairs(data: DataConfig, split: str) -> list[Pair]:
    """(source, target) sentence pairs of every selected corpus, in the configured direction."""
    pairs: list[Pair] = []
    for corpus in data.corpora:
        records = load_split(corpus, split)
        limit = {"train": data.train_limit, "valid": data.valid_limit}.get(split, 0)
        if limit:
            records = records[:limit]
        pairs += [(r[data.src_lang], r[data.tgt_lang]) for r in records]
    return pairs


def build_tokenizer(pairs: list[Pair], path: Path, model: TransformerConfig, sample: int, seed: int = 0) -> Tokenizer:
    """Train the joint source+target BPE (section 5.1: a shared vocabulary) or load it if `path` exists."""
    if not path.is_file():
        texts = [text for pair in pairs for text in pair]
        random.Random(seed).shuffle(texts)
        train_sentencepiece(
            texts[:sample],
            path,
            vocab_size=model.vocab_size,
            model_type="bpe",
            unk_id=0,
            bos_id=model.bos_id,
            eos_id=model.eos_id,
            pad_id=model.pad_id,
            num_threads=1,
        )
    tokenizer = load_tokenizer(path)
    check_tokenizer(tokenizer, model)
    return tokenizer


def check_tokenizer(tokenizer: Tokenizer, model: TransformerConfig) -> None:
    got = (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
    want = (model.vocab_size, model.pad_id, model.bos_id, model.eos_id)
    if got != want:
        raise ValueError(
            f"tokenizer {tokenizer.path} has (vocab_size, pad, bos, eos) = {got} but the model expects {want}; "
            "delete the tokenizer file to retrain it, or set --model.vocab_size to match"
        )


@dataclass(frozen=True)
class Example:
    src: list[int]  # ... eos
    tgt: list[int]  # without bos / eos

    @property
    def size(self) -> int:
        """Padded length this example needs: max(source, target + 1)."""
        return max(len(self.src), len(self.tgt) + 1)


def encode_pairs(tokenizer: Tokenizer, pairs: list[Pair], max_len: int, *, drop_long: bool = True) -> list[Example]:
    """Tokenize; pairs whose source (+eos) or target (+bos/eos) exceed max_len are dropped (drop_long) or truncated."""
    sources = tokenizer.encode_batch([s for s, _ in pairs])
    targets = tokenizer.encode_batch([t for _, t in pairs])
    examples = []
    for src, tgt in zip(sources, targets):
        if len(src) + 1 > max_len or len(tgt) + 1 > max_len:
            if drop_long:
                continue
            src, tgt = src[: max_len - 1], tgt[: max_len - 1]
        if src and tgt:
            examples.append(Example(src + [tokenizer.eos_id], tgt))
    return examples


def length_buckets(sizes: list[int], max_tokens: int, seed: int) -> list[list[int]]:
    """Batches of example indices: sorted by length (random tie order), filled while n * longest <= max_tokens,
    then shuffled. A pure function of its arguments, so a resumed run sees the same batches."""
    rng = random.Random(seed)
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], rng.random()))
    batches, current, longest = [], [], 0
    for i in order:
        new_longest = max(longest, sizes[i])
        if current and new_longest * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, new_longest = [], sizes[i]
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], model: TransformerConfig) -> tuple[Tensor, Tensor, Tensor]:
    """-> src (B, S), tgt_in (B, T), tgt_out (B, T), right-padded."""
    src = pad([e.src for e in examples], model.pad_id)
    tgt_in = pad([[model.bos_id] + e.tgt for e in examples], model.pad_id)
    tgt_out = pad([e.tgt + [model.eos_id] for e in examples], model.pad_id)
    return src, tgt_in, tgt_out


def pad(rows: list[list[int]], pad_id: int) -> Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class BucketedBatches:
    """This rank's micro-batch number m of an endless sequence of epochs, as a pure function of m (so a resumed run
    needs no data position of its own). Epoch e is length_buckets(seed * 100_003 + e); rank r takes every
    world_size-th batch (the list cut to a multiple of world_size, so ranks stay in step). Every epoch has the same
    number of batches: the sorted sizes, hence the greedy fill, do not depend on the seed."""

    def __init__(self, examples: list[Example], max_tokens: int, seed: int, *, rank: int = 0, world_size: int = 1):
        self.examples, self.max_tokens, self.seed, self.rank, self.world_size = examples, max_tokens, seed, rank, world_size
        self.sizes = [e.size for e in examples]
        self._epoch, self._batches = -1, []
        self.per_epoch = len(self._epoch_batches(0))

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:  # one epoch's buckets at a time (consecutive calls stay in the same epoch)
            batches = length_buckets(self.sizes, self.max_tokens, self.seed * 100_003 + epoch)
            self._epoch, self._batches = epoch, batches[: len(batches) - len(batches) % self.world_size][self.rank :: self.world_size]
        return self._batches

    def __call__(self, index: int) -> list[Example]:
        epoch, position = divmod(index, self.per_epoch)
        return [self.examples[i] for i in self._epoch_batches(epoch)[position]]
