"""`x-llama export`: a trained run where people run models.

- `gguf`: one file for llama.cpp (and so ollama, LM Studio, llama-cpp-python), written with the `gguf` package of the
  llama.cpp authors: the hyper-parameters as `llama.*` metadata, the SentencePiece vocabulary (pieces, scores, token
  types, BOS/EOS/UNK) as a `llama` tokenizer, and the tensors under llama.cpp's names. llama.cpp's LLaMA graph
  rotates Q and K in Meta's interleaved layout (pairs 2i, 2i+1), which is ours, so no weight is permuted (its
  converter for Hugging Face checkpoints un-permutes theirs). `--dtype f32 | f16 | q8_0`: the matrices in that type,
  the RMSNorm gains always in f32 (as llama.cpp's converter does); q8_0 stores blocks of 32 int8 values with one
  f16 scale each (8.5 bits per weight).
- `hf`: `save_pretrained` of the transformers `LlamaForCausalLM` (x_llama.hf.to_hf) and a Llama tokenizer built from
  the same SentencePiece model, loadable with `AutoModelForCausalLM` / `AutoTokenizer`.

Neither llama.cpp's SentencePiece tokenizer nor transformers' converted one applies SentencePiece's normaliser
(NFKC, and runs of whitespace collapsed to one space; our tokenizers keep SentencePiece's default `nmt_nfkc`): they
give our ids for text that is already normal (single spaces, NFKC); otherwise they may differ. Normalise text with
`" ".join(unicodedata.normalize("NFKC", text).split())` before tokenizing there for the same ids.
- `meta`: Meta's `params.json` + `consolidated.00.pth` (x_llama.hf.save_meta_checkpoint) and `tokenizer.model`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from axon_shared.config import ConfigError
from axon_shared.tokenizer import Tokenizer

from .config import ExportConfig
from .model import Llama

GGUF_DTYPES = ExportConfig.DTYPES

# our parameter names -> llama.cpp's (gguf.constants.TENSOR_NAMES for MODEL_ARCH.LLAMA)
_GGUF_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}
_GGUF_LAYER_NAMES = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
}


def gguf_tensor_name(name: str) -> str:
    """`layers.3.attention.wq.weight` -> `blk.3.attn_q.weight` (and the three tensors outside the blocks)."""
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    _, index, rest = name.split(".", 2)
    return f"blk.{index}.{_GGUF_LAYER_NAMES[rest]}"


def _sentencepiece_vocabulary(tokenizer: Tokenizer) -> tuple[list[bytes], list[float], list[int]]:
    """(pieces, scores, gguf token types) of every id, as llama.cpp's SentencePiece ("llama") tokenizer reads them."""
    import gguf

    sp = tokenizer.sp
    pieces, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return pieces, scores, types


def export_gguf(model: Llama, tokenizer: Tokenizer, path: str | Path, dtype: str = "f32", name: str = "x_llama") -> Path:
    """Write `model` and `tokenizer` as a llama.cpp GGUF file (see the module docstring); returns the path."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"GGUF dtype {dtype!r}: must be one of {list(GGUF_DTYPES)}")
    config = model.config
    config.require_llama2("llama.cpp's GGUF llama architecture")
    if tokenizer.vocab_size != config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is {config.vocab_size}")
    if dtype == "q8_0" and config.dim % 32:
        raise ConfigError(f"q8_0 quantises rows in blocks of 32 values; model.dim={config.dim} is not a multiple of 32 (use f16)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)

    pieces, scores, types = _sentencepiece_vocabulary(tokenizer)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_unk_token_id(tokenizer.unk_id)
    writer.add_add_bos_token(True)  # our prompts start with BOS (x_llama.generation)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)  # SentencePiece's add_dummy_prefix (its default, which our tokenizers keep)

    for name_, tensor in model.state_dict().items():
        data = tensor.detach().float().cpu().numpy()
        if data.ndim == 1 or dtype == "f32":  # norm gains stay f32
            writer.add_tensor(gguf_tensor_name(name_), data.astype(np.float32))
        elif dtype == "f16":
            writer.add_tensor(gguf_tensor_name(name_), data.astype(np.float16))
        else:
            quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_tensor_name(name_), quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)  # a reader never sees a half-written file
    return path


def llama_cpp_has_amx() -> bool:
    """Whether the installed llama.cpp was built with AMX int8 (and so puts q8_0/f16 weights in its AMX buffer)."""
    import llama_cpp.llama_cpp as bindings

    return b"AMX_INT8 = 1" in bindings.llama_print_system_info()


def open_in_llama_cpp(path: str | Path, n_ctx: int, n_threads: int = 2, repack: bool | None = None, **kwargs):
    """Load a GGUF file in llama.cpp through llama-cpp-python (`llama_cpp.Llama(path, n_ctx=..., **kwargs)`).

    `repack`: whether llama.cpp may move weights into its "extra" CPU buffers (repacked layouts and, on CPUs with
    AMX, the AMX buffer; `--no-repack` in llama.cpp's own tools). None means yes, except where llama.cpp was built
    with AMX int8: there llama.cpp 0.3.36's AMX matrix product dies with SIGSEGV on the first q8_0 forward (seen on a
    Sapphire-Rapids-class CPU, on the `cpu` run and the test models; llama.cpp issue #20824, a machine-dependent crash that is not fixed
    upstream). llama-cpp-python does not expose the switch (`llama_model_params.use_extra_bufts`), so it is set in the
    default parameters its constructor starts from, for this one call.
    """
    import llama_cpp
    import llama_cpp.llama_cpp as bindings

    if repack is None:
        repack = not llama_cpp_has_amx()
    default_params = bindings.llama_model_default_params

    def params_without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    if not repack:
        bindings.llama_model_default_params = params_without_extra_buffers
    try:
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=n_threads, **kwargs)
    finally:
        bindings.llama_model_default_params = default_params


def export_hf(model: Llama, tokenizer: Tokenizer, out_dir: str | Path) -> Path:
    """`save_pretrained` of the transformers model and a `LlamaTokenizer` on the same SentencePiece model."""
    from transformers import LlamaTokenizer

    from .hf import to_hf

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model = to_hf(model)
    hf_model.generation_config.bos_token_id = tokenizer.bos_id
    hf_model.generation_config.eos_token_id = tokenizer.eos_id
    hf_model.save_pretrained(out_dir)
    # transformers converts the SentencePiece model into its `tokenizers` backend (this reads the model's protobuf)
    shutil.copyfile(tokenizer.path, out_dir / "tokenizer.model")
    hf_tokenizer = LlamaTokenizer.from_pretrained(out_dir, legacy=True, add_bos_token=True, add_eos_token=False)
    hf_tokenizer.model_max_length = model.config.max_seq_len
    hf_tokenizer.save_pretrained(out_dir)
    return out_dir


def export_meta(model: Llama, tokenizer: Tokenizer, out_dir: str | Path) -> Path:
    """Meta's layout: params.json + consolidated.00.pth (one shard) + tokenizer.model."""
    from .hf import save_meta_checkpoint

    out_dir = save_meta_checkpoint(model, out_dir)
    shutil.copyfile(tokenizer.path, out_dir / "tokenizer.model")
    return out_dir


def export_command(cfg) -> Path:
    """`x-llama export --checkpoint RUN --format gguf|hf|meta [--dtype f32|f16|q8_0] --out PATH`."""
    from .train import load_pretrained

    model, tokenizer, _ = load_pretrained(cfg.checkpoint)
    if tokenizer is None:
        raise ConfigError(f"ExportConfig.checkpoint={cfg.checkpoint!r}: no tokenizer.model next to it; every format needs the tokenizer")
    model = model.float()
    with torch.no_grad():
        if cfg.format == "gguf":
            out = export_gguf(model, tokenizer, cfg.out, cfg.dtype)
        elif cfg.format == "hf":
            out = export_hf(model, tokenizer, cfg.out)
        else:
            out = export_meta(model, tokenizer, cfg.out)
    print(f"wrote {out} ({cfg.format}{', ' + cfg.dtype if cfg.format == 'gguf' else ''})")
    return out
