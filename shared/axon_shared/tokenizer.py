"""SentencePiece BPE tokenizers (Kudo & Richardson 2018), trained from a text iterator with explicit special ids.

Defaults follow Llama 2: unk 0, bos 1, eos 2, no pad (pad_id=-1). The Transformer passes pad_id=3.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from .errors import AxonError


class TokenizerError(AxonError, ValueError):
    """Missing or unreadable tokenizer model, or bad text."""


class Tokenizer:
    """A thin, typed wrapper over `SentencePieceProcessor`."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path | None = None):
        self.sp = processor
        self.path = path

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        return [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else []) for ids in self.sp.encode(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        specials = {self.bos_id, self.eos_id, self.pad_id}
        return self.sp.decode([int(i) for i in ids if int(i) not in specials])


def train_sentencepiece(
    texts: Iterable[str],
    out_path: str | Path,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    unk_id: int = 0,
    bos_id: int = 1,
    eos_id: int = 2,
    pad_id: int = -1,
    character_coverage: float = 1.0,
    input_sentence_size: int = 2_000_000,
    seed_sentencepiece_size: int = 1_000_000,
    num_threads: int | None = None,
) -> Tokenizer:
    """Train a SentencePiece model on `texts` (one sentence or paragraph each) and write it to out_path atomically."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentences = (t for t in texts if t and t.strip())
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        unk_id=unk_id,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=seed_sentencepiece_size,
        num_threads=num_threads or os.cpu_count() or 1,
        byte_fallback=False,
        minloglevel=2,
    )
    handle, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    with os.fdopen(handle, "wb") as file:
        file.write(model.getvalue())
    os.replace(tmp, out_path)
    return load_tokenizer(out_path)


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"no SentencePiece model at {path}; train one first (the package's train command does)")
    processor = spm.SentencePieceProcessor()
    try:
        processor.load(str(path))
    except (OSError, RuntimeError) as error:
        raise TokenizerError(f"{path}: not a readable SentencePiece model ({error})") from error
    return Tokenizer(processor, path)
