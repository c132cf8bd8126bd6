"""`transformer export --format marian`, checked by transformers itself: `MarianMTModel.from_pretrained` computes our
logits, its greedy `generate()` gives our greedy translations, and `MarianTokenizer.from_pretrained` gives our ids.

The model under test is tiny (d_model 32, 2 + 2 layers, a 256-piece joint BPE trained on 400 LibreOffice pairs) and
trained for 100 steps to copy its source: its greedy outputs are varied, some stop with eos and some run to the
length limit, which a random model's (one token repeated) would not exercise."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.testing import assert_close

from axon_shared.checkpoint import save_checkpoint
from axon_shared.config import ConfigError
from axon_shared.data import load_split
from transformer.cli import main
from transformer.config import ExportConfig, TrainConfig, TransformerConfig
from transformer.data import Example, build_tokenizer, collate, pad
from transformer.decoding import greedy_decode
from transformer.export import export_marian, residual_permutation, to_marian
from transformer.inference import Translator, load_model
from transformer.loss import label_smoothed_loss
from transformer.model import Transformer

transformers = pytest.importorskip("transformers")
MarianMTModel, MarianTokenizer = transformers.MarianMTModel, transformers.MarianTokenizer

MAX_LEN = 24
# float32 on both sides, the same operations in a different order (SDPA kernels, fused vs separate bias adds), and
# position tables rounded differently (ours computed in float32, Marian's in float64 then rounded: 2e-6 apart over
# 64 positions, 1.4e-5 over 256).
# Measured: 1.7e-5 on the trained model below (logits up to 8.5), 3.8e-6 on random `cpu`-size weights over 256
# positions; in float64 with the same table the two agree to 1e-14 (test_to_marian_on_random_weights), so what is
# left is rounding. A wrong mapping (a transposed or swapped weight, a lost bias, no permutation) moves logits by 0.1-10.
ATOL = 1e-4


def texts(lang: str, split: str, n: int, offset: int = 0) -> list[str]:
    return [record[lang] for record in load_split("de-en-libreoffice", split)[offset : offset + n]]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory (checkpoint + spm.model) of a tiny model trained to copy, and its Marian export."""
    root = tmp_path_factory.mktemp("marian")
    config = TrainConfig.from_preset("tiny", model=dict(vocab_size=256, max_len=MAX_LEN, dropout=0.0))
    pairs = [(r["en"], r["de"]) for r in load_split("de-en-libreoffice", "train")[:400]]
    tokenizer = build_tokenizer(pairs, root / "run" / "spm.model", config.model, sample=800)
    torch.manual_seed(0)
    model = Transformer(config.model)
    rows = [ids[:20] for ids in tokenizer.encode_batch(texts("en", "train", 16) + texts("de", "train", 16))]
    src, tgt_in, tgt_out = collate([Example(ids + [config.model.eos_id], ids) for ids in rows], config.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-9)
    for _ in range(100):
        loss, _, n = label_smoothed_loss(model(src, tgt_in), tgt_out, epsilon=0.0, pad_id=config.model.pad_id)
        optimizer.zero_grad()
        (loss / n).backward()
        optimizer.step()
    save_checkpoint(root / "run" / "checkpoints" / "step_00000100.safetensors", model=model, step=100, config=config.to_dict(), rng=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MarianTokenizer recommends sacremoses (used only by its unused normalize())
        main(["export", "--run_dir", str(root / "run"), "--format", "marian", "--out", str(root / "marian")])
        hf_model = MarianMTModel.from_pretrained(root / "marian").eval()
        hf_tokenizer = MarianTokenizer.from_pretrained(root / "marian")
    ours, tokenizer, _ = load_model(root / "run")
    return ours, tokenizer, hf_model, hf_tokenizer, root


def test_teacher_forced_logits_equal_ours(run):
    """Real sentence pairs, right-padded source (with its attention mask) and target, every position compared."""
    model, tokenizer, hf_model, _, _ = run
    cfg = model.config
    src = pad([ids[: MAX_LEN - 1] + [cfg.eos_id] for ids in tokenizer.encode_batch(texts("en", "valid", 16))], cfg.pad_id)
    tgt = pad([[cfg.bos_id] + ids[: MAX_LEN - 1] for ids in tokenizer.encode_batch(texts("de", "valid", 16))], cfg.pad_id)
    assert (src == cfg.pad_id).any() and (tgt == cfg.pad_id).any() and src.shape[1] == MAX_LEN  # padding and the last position
    with torch.no_grad():
        ours = model(src, tgt)
        theirs = hf_model(input_ids=src, attention_mask=(src != cfg.pad_id).long(), decoder_input_ids=tgt).logits
    assert ours.abs().max() > 3  # peaked logits, not near-uniform noise
    assert_close(theirs, ours, rtol=0, atol=ATOL)


def test_greedy_generate_translates_like_ours(run):
    """Text in, text out: MarianTokenizer -> generate() (its saved defaults: one beam, bos start, max_len) ->
    batch_decode equals Translator.translate(beam_size=1), and the tokens equal greedy_decode's."""
    model, tokenizer, hf_model, hf_tokenizer, _ = run
    cfg = model.config
    sources = texts("en", "test", 12) + texts("de", "test", 12)
    batch = hf_tokenizer(sources, return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        generated = hf_model.generate(**batch)
    assert (generated[:, 0] == cfg.bos_id).all()  # the decoder starts with bos, as ours
    ours = greedy_decode(model, batch["input_ids"])
    theirs = []
    for row in generated[:, 1:].tolist():
        theirs.append(row[: row.index(cfg.eos_id)] if cfg.eos_id in row else row)
    assert theirs == ours
    lengths = [len(tokens) for tokens in ours]
    assert min(lengths) < MAX_LEN - 1 and max(lengths) == MAX_LEN - 1  # some stop on eos, some reach the limit (eos forced)
    assert all(cfg.eos_id in row for row in generated.tolist())  # the forced eos at the limit: generate ends with eos too
    with pytest.warns(UserWarning, match="longer than max_len=24 tokens were truncated"):  # as truncation=True above
        translated = Translator(model, tokenizer).translate(sources, beam_size=1)
    # MarianTokenizer strips the decoded text; SentencePiece keeps the space of a last piece that is a lone "▁"
    assert hf_tokenizer.batch_decode(generated, skip_special_tokens=True) == [text.strip() for text in translated]
    assert len(set(translated)) > len(sources) // 2  # varied outputs, not one repeated string


def test_greedy_generate_with_a_length_limit(run):
    """max_new_tokens=L is our max_len=L: L tokens at most, eos included (forced at the limit)."""
    model, _, hf_model, hf_tokenizer, _ = run
    cfg = model.config
    batch = hf_tokenizer(texts("de", "valid", 8, offset=20), return_tensors="pt", padding=True, truncation=True)
    for limit in (3, 7):
        with torch.no_grad():
            generated = hf_model.generate(**batch, max_new_tokens=limit, num_beams=1, do_sample=False)
        ours = greedy_decode(model, batch["input_ids"], max_len=limit)
        theirs = [row[1 : row.index(cfg.eos_id) + 1] if cfg.eos_id in row else row[1:] for row in generated.tolist()]
        assert [t[:-1] if t and t[-1] == cfg.eos_id else t for t in theirs] == ours
        assert all(t[-1] == cfg.eos_id for t in theirs)  # every output ends with eos, as ours does


def test_tokenizer_encodes_and_decodes_like_ours(run):
    _, tokenizer, _, hf_tokenizer, _ = run
    eos = tokenizer.eos_id
    sentences = texts("en", "valid", 150) + texts("de", "valid", 150)
    edge = [
        "",
        "Open  the   file.",  # runs of spaces (SentencePiece's normaliser collapses them)
        "  leading and trailing  ",
        "ﬁle ＡＢＣ ①",  # NFKC: the ligature, full-width letters, a circled digit
        "Click 😀 OK. 中文",  # characters not in the vocabulary: unk
        "text with </s> and <pad> and <unk> and <s> in it",  # special pieces as text
        "Tab\there, new\nline",
        "Click OK , then it 's done . Right ?",  # spaces before punctuation (no clean-up of tokenization spaces)
    ]
    for text in sentences + edge:
        assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text) + [eos], repr(text)
    # decoding our ids gives our text (where there is no unk: test_tokenizer_differences_are_the_documented_ones)
    decoded = 0
    for ids in tokenizer.encode_batch(sentences + edge[-1:]):
        if tokenizer.unk_id not in ids:
            assert hf_tokenizer.decode([tokenizer.bos_id] + ids + [eos], skip_special_tokens=True) == tokenizer.decode(ids)
            decoded += 1
    assert decoded > 100
    # truncation keeps max_len - 1 pieces + eos, as Translator does
    long = " ".join(sentences[:20])
    assert hf_tokenizer(long, truncation=True)["input_ids"] == tokenizer.encode(long)[: MAX_LEN - 1] + [eos]


def test_tokenizer_differences_are_the_documented_ones(run):
    """A leading >>xx<< is a language code for MarianTokenizer (one token, unknown here); unk decodes differently."""
    _, tokenizer, _, hf_tokenizer, _ = run
    assert hf_tokenizer(">>de<< Open the file.")["input_ids"] == [tokenizer.unk_id] + tokenizer.encode("Open the file.") + [
        tokenizer.eos_id
    ]
    ids = tokenizer.encode("Click 😀 OK.")
    assert tokenizer.unk_id in ids
    assert "⁇" in tokenizer.decode(ids) and "⁇" not in hf_tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_to_marian_on_random_weights(activation):
    """Without training: every bias and LayerNorm parameter random too (they are zero / one at initialisation, where a
    forgotten or unpermuted one would go unnoticed); longer sequences (positions up to 63)."""
    torch.manual_seed(1)
    cfg = TransformerConfig.from_preset("tiny", max_len=64, activation=activation, dropout=0.0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.5 * torch.randn_like(p))
    marian = to_marian(model)
    gen = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(4, cfg.vocab_size, (2, 3, 64), generator=gen)
    src[:, -1], src[1, 40:], src[1, 39] = cfg.eos_id, cfg.pad_id, cfg.eos_id
    tgt[:, 0] = cfg.bos_id
    with torch.no_grad():
        theirs = marian(input_ids=src, attention_mask=(src != cfg.pad_id).long(), decoder_input_ids=tgt).logits
        assert_close(theirs, model(src, tgt), rtol=0, atol=ATOL)
    # exact up to rounding: in float64, with our table in place of Marian's float64-then-float32 one, 1e-10
    perm = residual_permutation(cfg.d_model)
    model, marian = model.double(), marian.double()
    with torch.no_grad():
        for table in (marian.model.encoder.embed_positions.weight, marian.model.decoder.embed_positions.weight):
            table.copy_(model.positions[:, perm])
        theirs = marian(input_ids=src, attention_mask=(src != cfg.pad_id).long(), decoder_input_ids=tgt).logits
        assert_close(theirs, model(src, tgt), rtol=0, atol=1e-10)
    # the permutation is what makes the position tables agree (Marian rebuilds its table at load)
    positions = to_marian(Transformer(cfg)).model.encoder.embed_positions.weight  # as Marian builds it
    assert_close(positions, model.positions[:, perm].float(), rtol=0, atol=1e-5)  # float32 rounding of p * w_i: 1.9e-6 here
    assert (positions - model.positions.float()).abs().max() > 0.5


def test_configurations_marian_cannot_express_are_refused(run, tmp_path):
    model, tokenizer, _, _, _ = run
    with pytest.raises(ConfigError, match=r"norm_first=True \(pre-norm\): MarianMTModel is post-norm only"):
        to_marian(Transformer(TransformerConfig.from_preset("tiny", norm_first=True)))
    with pytest.raises(ConfigError, match="layer_norm_eps=1e-06: MarianMTModel's LayerNorms use epsilon 1e-05"):
        to_marian(Transformer(TransformerConfig.from_preset("tiny", layer_norm_eps=1e-6)))
    other = Transformer(TransformerConfig.from_preset("tiny", vocab_size=300))
    with pytest.raises(ConfigError, match="the tokenizer has 256 pieces but the model's vocab_size is 300"):
        export_marian(other, tokenizer, tmp_path / "out")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not an empty directory or an earlier Marian export"):
        export_marian(model, tokenizer, tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_cli_errors_name_the_field(run):
    _, _, _, _, root = run
    with pytest.raises(SystemExit, match="ExportConfig.format='onnx': must be one of"):
        main(["export", "--run_dir", str(root / "run"), "--format", "onnx"])
    with pytest.raises(ConfigError, match="format"):
        ExportConfig(format="gguf")


def test_export_replaces_an_earlier_export_and_auto_classes_load_it(run):
    """Exporting again over the same --out swaps the directory in whole; nothing is left beside it."""
    _, _, _, _, root = run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["export", "--run_dir", str(root / "run"), "--out", str(root / "marian")])
        assert isinstance(transformers.AutoTokenizer.from_pretrained(root / "marian"), MarianTokenizer)
        assert isinstance(transformers.AutoModelForSeq2SeqLM.from_pretrained(root / "marian"), MarianMTModel)
    assert sorted(p.name for p in root.iterdir()) == ["marian", "run"]
    assert {"config.json", "generation_config.json", "model.safetensors", "source.spm", "target.spm", "vocab.json"} <= {
        p.name for p in (root / "marian").iterdir()
    }
