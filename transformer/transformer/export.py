"""`transformer export --format marian`: a trained run as a Hugging Face `MarianMTModel` directory.

`MarianMTModel` is the same architecture as ours when the configuration is the paper's: post-norm sublayers,
ReLU (or exact GELU) feed-forward layers, one embedding matrix shared by the encoder, the decoder and the output
projection, embeddings scaled by sqrt(d_model), sinusoidal positions, attention with biases and 1/sqrt(d_k) scaling.
What needs care:

- **Positions.** Vaswani's table interleaves sin and cos, PE[p, 2i] = sin(p w_i), PE[p, 2i+1] = cos(p w_i); Marian's
  puts them in halves, [sin(p w_0..) | cos(p w_0..)], with the same frequencies w_i = 10000^(-2i/d). Marian does not
  save that table: `save_pretrained` leaves it out and `from_pretrained` rebuilds it, so ours cannot be written as a
  weight. Instead the whole residual stream is re-ordered by the permutation P = [0, 2, 4, .., 1, 3, 5, ..] (its
  even features first, then its odd ones), which turns our table into Marian's (up to the float32 rounding of the two
  tables: ours is computed in float32, Marian's in float64). A permutation commutes with
  everything a post-norm Transformer does to the residual stream: LayerNorm's mean and variance do not depend on the
  order of the features (its gain and bias are permuted with them), every Linear that reads the stream (q, k, v,
  cross-attention k, v from the encoder output, the first FFN layer) has its input columns permuted, every Linear
  that writes it (the attention output projection, the second FFN layer) its output rows and bias, and the
  embedding matrix its columns, so that the output projection h E^T = (h P)(E P)^T gives the same logits. The heads
  (the outputs of q, k, v) are not touched.
- **What Marian fixes.** LayerNorm's epsilon is torch's default 1e-5 (MarianConfig has no field for it); there is no
  pre-norm variant (no final LayerNorm); the output layer has no bias other than `final_logits_bias`, written as
  zeros (ours has none). Configurations outside this raise a ConfigError naming the field (`marian_problems`).
- **Tokens.** Marian's config says pad, eos, bos and the decoder start token; ours start decoding with bos (id 1),
  not with pad as Helsinki-NLP's models do. The generation config makes `generate()` our greedy decoder: one beam,
  decoder start bos, eos forced when the length limit is reached (`forced_eos_token_id`, as our decoder does), and
  `max_length` = model.max_len + 1 (generate counts the start token), the cap our decoder applies.
- **Tokenizer.** Our one joint SentencePiece model is written as both `source.spm` and `target.spm` with a
  `vocab.json` of its pieces in id order, so `MarianTokenizer` gives our ids: the pieces followed by eos. It is saved
  with `split_special_tokens=True`, so text such as "</s>" is tokenized as text, as SentencePiece does.

What still differs (transformer/README.md, "Running it in Hugging Face"): MarianTokenizer takes a leading ">>xx<<"
as a language code (one token, unknown to our vocabulary); in decoding it strips the text and drops an unknown token
(skip_special_tokens) or writes "<unk>", where SentencePiece writes " ⁇ "; generate() has one length limit per call,
ours min(|x| + 50, max_len) per sentence; and beam search is not ours: generate()'s length penalty divides the
log-probability by |Y|^alpha, ours (Wu et al. 2016) by ((5 + |Y|) / 6)^alpha. Greedy outputs are the same
(tests/transformer/test_export.py).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import Tensor

from axon_shared.config import ConfigError
from axon_shared.tokenizer import Tokenizer

from .config import ExportConfig, TransformerConfig
from .model import Transformer

MARIAN_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which MarianEncoderLayer / MarianDecoderLayer use
MARIAN_ACTIVATIONS = {"relu": "relu", "gelu": "gelu"}  # ours nn.ReLU / nn.GELU() -> transformers' ACT2FN names (exact erf GELU)


def marian_problems(config: TransformerConfig) -> list[str]:
    """Why `config` cannot be written as a MarianMTModel (empty when it can)."""
    problems = []
    if config.norm_first:
        problems.append(
            "model.norm_first=True (pre-norm): MarianMTModel is post-norm only, LayerNorm(x + Sublayer(x)), and has no final "
            "LayerNorm for the pre-norm stacks; only post-norm runs (the paper's, the default) can be exported"
        )
    if config.layer_norm_eps != MARIAN_LAYER_NORM_EPS:
        problems.append(
            f"model.layer_norm_eps={config.layer_norm_eps:g}: MarianMTModel's LayerNorms use epsilon {MARIAN_LAYER_NORM_EPS:g} "
            "and MarianConfig cannot change it"
        )
    if config.activation not in MARIAN_ACTIVATIONS:
        problems.append(f"model.activation={config.activation!r}: no MarianMTModel activation equals it")
    return problems


def check_marian(config: TransformerConfig) -> None:
    problems = marian_problems(config)
    if problems:
        raise ConfigError("cannot export as a MarianMTModel: " + "; ".join(problems))


def residual_permutation(d_model: int) -> Tensor:
    """P with marian_feature[k] = our_feature[P[k]]: our interleaved sin/cos features as Marian's [sin | cos] halves."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def marian_config(config: TransformerConfig):
    """The MarianConfig of the same architecture (post-norm, shared and tied embeddings scaled by sqrt(d_model))."""
    from transformers import MarianConfig

    check_marian(config)
    return MarianConfig(
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        encoder_layers=config.n_encoder_layers,
        decoder_layers=config.n_decoder_layers,
        encoder_attention_heads=config.n_heads,
        decoder_attention_heads=config.n_heads,
        encoder_ffn_dim=config.d_ff,
        decoder_ffn_dim=config.d_ff,
        activation_function=MARIAN_ACTIVATIONS[config.activation],
        dropout=config.dropout,  # on embeddings + positions and on each residual branch, as ours
        attention_dropout=config.attention_dropout,
        activation_dropout=0.0,  # ours has no dropout inside the FFN
        max_position_embeddings=config.max_len,
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
        pad_token_id=config.pad_id,
        eos_token_id=config.eos_id,
        bos_token_id=config.bos_id,
        decoder_start_token_id=config.bos_id,
        forced_eos_token_id=config.eos_id,
    )


def _marian_weights(model: Transformer) -> dict[str, Tensor]:
    """Our state dict under Marian's names, the residual stream permuted (module docstring)."""
    perm = residual_permutation(model.config.d_model)
    reads = lambda w: w[:, perm]  # a Linear whose input is the residual stream: permute its input columns
    writes = lambda w: w[perm]  # a Linear (weight rows, bias) or LayerNorm (gain, bias) whose output is the stream
    keep = lambda w: w

    # our sub-module -> (Marian's, how its weight maps, how its bias maps)
    attention = {"q_proj": (reads, keep), "k_proj": (reads, keep), "v_proj": (reads, keep), "out_proj": (writes, writes)}
    ffn = {"ffn.linear1": ("fc1", reads, keep), "ffn.linear2": ("fc2", writes, writes)}
    layer_maps = {
        "encoder": {"self_attn": "self_attn", "sub_attn.norm": "self_attn_layer_norm", "sub_ffn.norm": "final_layer_norm"},
        "decoder": {
            "self_attn": "self_attn",
            "sub_self.norm": "self_attn_layer_norm",
            "cross_attn": "encoder_attn",
            "sub_cross.norm": "encoder_attn_layer_norm",
            "sub_ffn.norm": "final_layer_norm",
        },
    }
    out: dict[str, Tensor] = {}
    state = {name: tensor.detach().float().cpu() for name, tensor in model.state_dict().items()}
    used = set()

    def put(ours: str, theirs: str, how) -> None:
        out[theirs] = how(state[ours]).contiguous()
        used.add(ours)

    put("embedding.weight", "model.shared.weight", reads)  # (V, d): the columns are features of the stream
    for stack, names in layer_maps.items():
        for i in range(len(getattr(model, f"{stack}_layers"))):
            ours, theirs = f"{stack}_layers.{i}", f"model.{stack}.layers.{i}"
            for our_name, their_name in names.items():
                if our_name.endswith("norm"):
                    put(f"{ours}.{our_name}.weight", f"{theirs}.{their_name}.weight", writes)
                    put(f"{ours}.{our_name}.bias", f"{theirs}.{their_name}.bias", writes)
                    continue
                for proj, (weight_map, bias_map) in attention.items():
                    put(f"{ours}.{our_name}.{proj}.weight", f"{theirs}.{their_name}.{proj}.weight", weight_map)
                    put(f"{ours}.{our_name}.{proj}.bias", f"{theirs}.{their_name}.{proj}.bias", bias_map)
            for our_name, (their_name, weight_map, bias_map) in ffn.items():
                put(f"{ours}.{our_name}.weight", f"{theirs}.{their_name}.weight", weight_map)
                put(f"{ours}.{our_name}.bias", f"{theirs}.{their_name}.bias", bias_map)
    left = sorted(set(state) - used)
    if left:  # a parameter this mapping does not know (a newer model.py): refuse rather than drop it
        raise ConfigError(f"cannot export as a MarianMTModel: no Marian weight for {left}")
    return out


def to_marian(model: Transformer):
    """A transformers `MarianMTModel` (eval mode, float32) computing the same function as `model`."""
    from transformers import GenerationConfig, MarianMTModel

    config = model.config
    marian = MarianMTModel(marian_config(config))
    weights = _marian_weights(model)
    weights["final_logits_bias"] = torch.zeros(1, config.vocab_size)  # ours has no output bias
    # Marian's own copies: the position tables are rebuilt from the config (never saved); the encoder, decoder and
    # output embeddings are tied to model.shared
    derived = {
        "model.encoder.embed_positions.weight",
        "model.decoder.embed_positions.weight",
        "model.encoder.embed_tokens.weight",
        "model.decoder.embed_tokens.weight",
        "lm_head.weight",
    }
    expected = set(marian.state_dict()) - derived
    if set(weights) != expected:
        raise ConfigError(
            "cannot export as a MarianMTModel: this transformers version names its weights differently "
            f"(missing {sorted(expected - set(weights))[:4]}, unknown {sorted(set(weights) - expected)[:4]})"
        )
    marian.load_state_dict(weights, strict=False)
    shared = marian.model.shared.weight
    tied = (marian.model.encoder.embed_tokens.weight, marian.model.decoder.embed_tokens.weight, marian.lm_head.weight)
    if any(w.data_ptr() != shared.data_ptr() for w in tied):
        raise ConfigError("cannot export as a MarianMTModel: its embeddings are not tied to model.shared in this transformers version")
    marian.generation_config = GenerationConfig(
        decoder_start_token_id=config.bos_id,
        bos_token_id=config.bos_id,
        eos_token_id=config.eos_id,
        pad_token_id=config.pad_id,
        forced_eos_token_id=config.eos_id,  # at the length limit the last token is eos (transformer.decoding)
        max_length=config.max_len + 1,  # the start token + at most max_len tokens, eos included
        num_beams=1,
        do_sample=False,
    )
    return marian.eval()


def write_marian_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, *, model_max_length: int, source_lang=None, target_lang=None):
    """Write source.spm = target.spm = our joint SentencePiece model, vocab.json = its pieces by id, and the
    MarianTokenizer's own files (save_pretrained) into out_dir; returns that MarianTokenizer."""
    from transformers import MarianTokenizer

    out_dir = Path(out_dir)
    if tokenizer.path is None or not Path(tokenizer.path).is_file():
        raise ConfigError("the tokenizer has no SentencePiece model file to copy")
    sp = tokenizer.sp
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ConfigError(f"{tokenizer.path}: its pieces are not unique; vocab.json maps each piece to one id")
    if min(tokenizer.unk_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id) < 0:
        raise ConfigError(f"{tokenizer.path}: MarianTokenizer needs unk, bos, eos and pad pieces; this model lacks one")
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    for name in ("source.spm", "target.spm"):
        shutil.copyfile(tokenizer.path, out_dir / name)
    with warnings.catch_warnings():
        # "Recommended: pip install sacremoses": only MarianTokenizer.normalize() uses it, which encoding does not call
        warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
        hf_tokenizer = MarianTokenizer(
            source_spm=str(out_dir / "source.spm"),
            target_spm=str(out_dir / "target.spm"),
            vocab=str(out_dir / "vocab.json"),
            source_lang=source_lang,
            target_lang=target_lang,
            unk_token=pieces[tokenizer.unk_id],
            eos_token=pieces[tokenizer.eos_id],
            pad_token=pieces[tokenizer.pad_id],
            bos_token=pieces[tokenizer.bos_id],  # never added to inputs; special, so decode(skip_special_tokens) drops it
            model_max_length=model_max_length,  # truncation=True keeps max_len - 1 pieces + eos, as Translator does
            split_special_tokens=True,  # "</s>" in text is text, as in SentencePiece
            clean_up_tokenization_spaces=False,  # decode as SentencePiece does (no " ." -> "." rewriting)
        )
    hf_tokenizer.save_pretrained(out_dir)
    return hf_tokenizer


@torch.no_grad()
def max_logit_difference(model: Transformer, marian, *, seed: int = 0) -> float:
    """max |ours - Marian| over the teacher-forced logits of two random right-padded sentence pairs (a self-check)."""
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    length = min(12, config.max_len)
    words = torch.tensor([t for t in range(config.vocab_size) if t not in {config.pad_id, config.bos_id, config.eos_id}])
    if len(words) == 0:
        raise ConfigError(f"model.vocab_size={config.vocab_size} holds only the special tokens; nothing to translate")
    src, tgt = (words[torch.randint(len(words), (2, length), generator=gen)] for _ in range(2))
    src[:, -1] = config.eos_id
    src[1, length // 2 - 1], src[1, length // 2 :] = config.eos_id, config.pad_id  # a shorter, padded source
    tgt[:, 0] = config.bos_id
    ours = model(src, tgt)
    theirs = marian(input_ids=src, attention_mask=(src != config.pad_id).long(), decoder_input_ids=tgt).logits
    return float((ours - theirs).abs().max())


def export_marian(
    model: Transformer, tokenizer: Tokenizer, out_dir: str | Path, *, source_lang: str | None = None, target_lang: str | None = None
) -> tuple[Path, float]:
    """Write `save_pretrained` of the MarianMTModel and a MarianTokenizer to out_dir (built in a temporary sibling
    directory, then moved into place). Returns the directory and the self-check's max logit difference."""
    config = model.config
    check_marian(config)
    if tokenizer.vocab_size != config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is {config.vocab_size}")
    ids = (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
    if ids != (config.pad_id, config.bos_id, config.eos_id):
        raise ConfigError(f"the tokenizer's (pad, bos, eos) = {ids} but the model's are {(config.pad_id, config.bos_id, config.eos_id)}")
    out_dir = Path(out_dir)
    earlier_export = all((out_dir / name).is_file() for name in ("config.json", "vocab.json", "source.spm"))
    if out_dir.exists() and not (out_dir.is_dir() and (earlier_export or not any(out_dir.iterdir()))):
        raise ConfigError(f"--out {out_dir}: exists and is not an empty directory or an earlier Marian export; choose another --out")
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).float().cpu()  # the export and its self-check are float32 on the CPU
    was_training = model.training
    try:
        marian = to_marian(model)
        difference = max_logit_difference(model.eval(), marian)
    finally:
        model.train(was_training)
    if not difference < 1e-3:  # measured 2e-6 - 2e-5 (tests/transformer/test_export.py); more is a mapping bug
        raise ConfigError(f"the MarianMTModel's logits differ from ours by {difference:.3g}: not exported")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")  # a sibling, so the final rename stays on one file system
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        marian.save_pretrained(tmp)
        write_marian_tokenizer(tokenizer, tmp, model_max_length=config.max_len, source_lang=source_lang, target_lang=target_lang)
        if out_dir.exists():  # an earlier export: swap it out, then delete it
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir, difference


def export_command(cfg: ExportConfig) -> Path:
    """`transformer export --run_dir RUN [--checkpoint FILE] [--average_last N] [--use_ema true] --format marian --out DIR`."""
    from .inference import load_model

    model, tokenizer, train_config = load_model(cfg.run_dir, cfg.checkpoint, cfg.average_last, use_ema=cfg.use_ema)
    check_marian(model.config)  # before any work
    out = Path(cfg.out) if cfg.out else Path(cfg.run_dir) / "marian"
    out, difference = export_marian(model, tokenizer, out, source_lang=train_config.data.src_lang, target_lang=train_config.data.tgt_lang)
    print(f"wrote {out} (MarianMTModel + MarianTokenizer; max |logit difference| to ours {difference:.2g} on a random batch)")
    return out
