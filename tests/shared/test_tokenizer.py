"""SentencePiece helper: explicit special ids, round trips, atomic save, clear errors."""

import pytest

from axon_shared import TokenizerError, load_tokenizer, train_sentencepiece

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Select the cell range and choose Format - Cells.",
    "Wählen Sie den Zellbereich und dann Format - Zellen.",
] * 50


def test_train_and_load_with_explicit_ids(tmp_path):
    tok = train_sentencepiece(TEXT, tmp_path / "sp.model", vocab_size=120, pad_id=3)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 2, 3, 120)
    ids = tok.encode("The quick brown fox", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "The quick brown fox"
    assert tok.encode_batch(["Hund.", "fox"], eos=True) == [tok.encode("Hund.", eos=True), tok.encode("fox", eos=True)]
    again = load_tokenizer(tmp_path / "sp.model")
    assert again.encode("Format - Zellen") == tok.encode("Format - Zellen")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sp.model"]


def test_llama_convention_has_no_pad(tmp_path):
    tok = train_sentencepiece(TEXT, tmp_path / "sp.model", vocab_size=100)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)


def test_missing_or_broken_model_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no SentencePiece model"):
        load_tokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a readable"):
        load_tokenizer(tmp_path / "bad.model")
