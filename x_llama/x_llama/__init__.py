"""x_llama: Llama 2 (Touvron et al. 2023) from scratch: RoPE, RMSNorm, SwiGLU, MHA/GQA/MQA, a KV cache,
Hugging Face / Meta interop, pretraining on en-text and generation. See README.md."""

from .config import DataConfig, LlamaConfig, TrainConfig, TrainSection
from .generation import Generation, generate, sample_next, stream_generate
from .model import KVCache, Llama, RMSNorm, SwiGLU, lm_loss


def load_pretrained(path, device="cpu"):
    """(model, tokenizer, config) from a run directory or a checkpoint file; see x_llama.train.load_pretrained."""
    from .train import load_pretrained as _load

    return _load(path, device=device)


__all__ = [
    "DataConfig",
    "Generation",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "RMSNorm",
    "SwiGLU",
    "TrainConfig",
    "TrainSection",
    "generate",
    "lm_loss",
    "load_pretrained",
    "sample_next",
    "stream_generate",
]
