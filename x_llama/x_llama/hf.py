"""Interop with Hugging Face transformers and Meta's released checkpoints.

- `from_hf(hf_model) -> Llama`, `to_hf(model) -> transformers.LlamaForCausalLM`: weights converted with the RoPE
  row permutation (x_llama keeps Meta's interleaved layout; HF uses the "half" layout, see rope.py).
- `load_meta_checkpoint(dir)` / `save_meta_checkpoint(model, dir)`: `params.json` + `consolidated.NN.pth`
  (loaded with `weights_only=True`; model-parallel shards are concatenated along their split axis).
- `XLlamaConfig` / `XLlamaForCausalLM` / `XLlamaForSequenceClassification`: a `PreTrainedModel` wrapper
  registered with AutoConfig / AutoModelForCausalLM / AutoModelForSequenceClassification (model_type
  "x_llama"), so `generate()`, `save_pretrained` / `from_pretrained` and trl's trainers accept x_llama models.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GenerationMixin,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import LlamaConfig as HFLlamaConfig
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, SequenceClassifierOutputWithPast

from .config import LlamaConfig, ffn_hidden_dim
from .model import Llama, lm_loss
from .rope import permute_for_half, permute_for_interleaved

# ---- Hugging Face LlamaForCausalLM <-> x_llama ---------------------------------------------------------------


def config_from_hf(hf_config: HFLlamaConfig) -> LlamaConfig:
    """Our config for an HF Llama config. HF stores the FFN width directly; we pick multiple_of /
    ffn_dim_multiplier so that Meta's rounding rule reproduces it exactly."""
    dim, hidden = hf_config.hidden_size, hf_config.intermediate_size
    head_dim = getattr(hf_config, "head_dim", None) or dim // hf_config.num_attention_heads
    if head_dim * hf_config.num_attention_heads != dim:
        raise ValueError(f"head_dim={head_dim} * num_attention_heads must equal hidden_size={dim} (Llama 2 layout)")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise ValueError("Llama 2 has no biases; this HF config has attention_bias/mlp_bias set")
    if getattr(hf_config, "tie_word_embeddings", False):
        raise ValueError("Llama 2 has an untied output head; this HF config ties the embeddings")
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"only plain RoPE is supported, got rope_type={rope.get('rope_type')!r}")
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    base = int(2 * 4 * dim / 3)
    multiplier = None if base <= hidden else hidden / base
    config = LlamaConfig(
        vocab_size=hf_config.vocab_size,
        dim=dim,
        n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads,
        n_kv_heads=hf_config.num_key_value_heads,
        multiple_of=hidden,
        ffn_dim_multiplier=multiplier,
        norm_eps=hf_config.rms_norm_eps,
        rope_theta=float(theta),
        max_seq_len=hf_config.max_position_embeddings,
        init_std=getattr(hf_config, "initializer_range", 0.02),
    )
    assert ffn_hidden_dim(config.dim, config.multiple_of, config.ffn_dim_multiplier) == hidden
    return config


def config_to_hf(config: LlamaConfig, **kwargs: Any) -> HFLlamaConfig:
    config.require_llama2("transformers' LlamaForCausalLM")
    return HFLlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.norm_eps,
        max_position_embeddings=config.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=config.init_std,
        bos_token_id=1,
        eos_token_id=2,
        **kwargs,
    )


def state_dict_from_hf(hf_state: dict[str, Tensor], config: LlamaConfig) -> dict[str, Tensor]:
    """HF names/layout -> x_llama (= Meta) names/layout: W_q, W_k rows back to the interleaved RoPE layout."""
    out = {
        "tok_embeddings.weight": hf_state["model.embed_tokens.weight"],
        "norm.weight": hf_state["model.norm.weight"],
        "output.weight": hf_state["lm_head.weight"],
    }
    for i in range(config.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        out[ours + "attention.wq.weight"] = permute_for_interleaved(hf_state[hf + "self_attn.q_proj.weight"], config.n_heads)
        out[ours + "attention.wk.weight"] = permute_for_interleaved(hf_state[hf + "self_attn.k_proj.weight"], config.kv_heads)
        out[ours + "attention.wv.weight"] = hf_state[hf + "self_attn.v_proj.weight"]
        out[ours + "attention.wo.weight"] = hf_state[hf + "self_attn.o_proj.weight"]
        out[ours + "feed_forward.w1.weight"] = hf_state[hf + "mlp.gate_proj.weight"]
        out[ours + "feed_forward.w3.weight"] = hf_state[hf + "mlp.up_proj.weight"]
        out[ours + "feed_forward.w2.weight"] = hf_state[hf + "mlp.down_proj.weight"]
        out[ours + "attention_norm.weight"] = hf_state[hf + "input_layernorm.weight"]
        out[ours + "ffn_norm.weight"] = hf_state[hf + "post_attention_layernorm.weight"]
    return out


def state_dict_to_hf(state: dict[str, Tensor], config: LlamaConfig) -> dict[str, Tensor]:
    """x_llama (= Meta) -> HF: W_q, W_k rows to the half layout (n_kv_heads for W_k under GQA)."""
    out = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
        "lm_head.weight": state["output.weight"],
    }
    for i in range(config.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        out[hf + "self_attn.q_proj.weight"] = permute_for_half(state[ours + "attention.wq.weight"], config.n_heads)
        out[hf + "self_attn.k_proj.weight"] = permute_for_half(state[ours + "attention.wk.weight"], config.kv_heads)
        out[hf + "self_attn.v_proj.weight"] = state[ours + "attention.wv.weight"]
        out[hf + "self_attn.o_proj.weight"] = state[ours + "attention.wo.weight"]
        out[hf + "mlp.gate_proj.weight"] = state[ours + "feed_forward.w1.weight"]
        out[hf + "mlp.up_proj.weight"] = state[ours + "feed_forward.w3.weight"]
        out[hf + "mlp.down_proj.weight"] = state[ours + "feed_forward.w2.weight"]
        out[hf + "input_layernorm.weight"] = state[ours + "attention_norm.weight"]
        out[hf + "post_attention_layernorm.weight"] = state[ours + "ffn_norm.weight"]
    return out


def from_hf(hf_model: LlamaForCausalLM) -> Llama:
    """A new x_llama `Llama` with the weights of a transformers `LlamaForCausalLM` (copied)."""
    config = config_from_hf(hf_model.config)
    model = Llama(config).to(hf_model.dtype)
    state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    model.load_state_dict(state_dict_from_hf(state, config), strict=True)
    return model


def to_hf(model: Llama, attn_implementation: str = "eager") -> LlamaForCausalLM:
    """A transformers `LlamaForCausalLM` with this model's weights (copied)."""
    hf_config = config_to_hf(model.config)
    hf_config._attn_implementation = attn_implementation
    hf_model = LlamaForCausalLM(hf_config).to(model.tok_embeddings.weight.dtype)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hf_model.load_state_dict(state_dict_to_hf(state, model.config), strict=True)
    return hf_model.eval()


# ---- Meta's params.json + consolidated.NN.pth --------------------------------------------------------------

# Axis along which Meta's model-parallel shards split each tensor (fairscale Column/RowParallelLinear,
# ParallelEmbedding); None = replicated (the norms).
_META_SPLIT_AXIS = {
    "tok_embeddings": 1,
    "output": 0,
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "wo": 1,
    "w1": 0,
    "w3": 0,
    "w2": 1,
    "norm": None,
}


def _split_axis(name: str) -> int | None:
    for key, axis in _META_SPLIT_AXIS.items():
        if f"{key}.weight" in name or name.startswith(key):
            return axis
    return None


def meta_params_to_config(params: dict[str, Any], max_seq_len: int = 4096) -> LlamaConfig:
    params = dict(params)
    vocab = params.pop("vocab_size", 32000)
    return LlamaConfig(
        vocab_size=32000 if vocab in (-1, None) else vocab,
        dim=params["dim"],
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"),
        multiple_of=params.get("multiple_of", 256),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 10000.0),
        max_seq_len=params.get("max_seq_len", max_seq_len),
    )


def load_meta_checkpoint(directory: str | Path, max_seq_len: int = 4096, dtype: torch.dtype = torch.float32) -> Llama:
    """Build a `Llama` from Meta's release folder (params.json + consolidated.00.pth, .01, ...).

    The files are read with `torch.load(weights_only=True)` (tensors only, no code). Meta's layout is
    x_llama's layout, so no RoPE permutation is needed here (it is needed for HF, see `to_hf`)."""
    directory = Path(directory)
    params_file = directory / "params.json"
    shards = sorted(directory.glob("consolidated.*.pth"))
    if not params_file.is_file() or not shards:
        raise FileNotFoundError(f"{directory}: expected params.json and consolidated.*.pth (Meta's Llama 2 release layout)")
    config = meta_params_to_config(json.loads(params_file.read_text()), max_seq_len)
    states = [torch.load(shard, map_location="cpu", weights_only=True, mmap=True) for shard in shards]
    merged: dict[str, Tensor] = {}
    for name in states[0]:
        if name.endswith("rope.freqs"):  # a buffer some releases store; we recompute it
            continue
        axis = _split_axis(name.split(".")[-2] + ".weight" if "layers." in name else name)
        parts = [state[name] for state in states]
        merged[name] = parts[0] if axis is None or len(parts) == 1 else torch.cat(parts, dim=axis)
    model = Llama(config)
    model.load_state_dict({k: v.to(dtype) for k, v in merged.items()}, strict=True)
    return model.to(dtype)


def save_meta_checkpoint(model: Llama, directory: str | Path) -> Path:
    """Write params.json + consolidated.00.pth in Meta's format (a single shard)."""
    model.config.require_llama2("Meta's checkpoint format")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    c = model.config
    params = dict(
        dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, multiple_of=c.multiple_of, norm_eps=c.norm_eps, vocab_size=c.vocab_size
    )
    if c.n_kv_heads is not None:
        params["n_kv_heads"] = c.n_kv_heads
    if c.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = c.ffn_dim_multiplier
    if c.rope_theta != 10000.0:
        params["rope_theta"] = c.rope_theta
    (directory / "params.json").write_text(json.dumps(params))
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, directory / "consolidated.00.pth")
    return directory


# ---- transformers wrapper ----------------------------------------------------------------------------------


class XLlamaConfig(PretrainedConfig):
    """An HF config holding the fields of `x_llama.LlamaConfig` (model_type "x_llama")."""

    model_type = "x_llama"
    auto_map = {}  # trl reads config.auto_map when loading by path (a plain class attribute, not a field)
    attribute_map = {
        "hidden_size": "dim",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "max_seq_len",
    }

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    init_std: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False

    @classmethod
    def from_llama_config(cls, config: LlamaConfig, **kwargs: Any) -> XLlamaConfig:
        return cls(**config.to_dict(), **kwargs)

    def to_llama_config(self) -> LlamaConfig:
        names = (
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "multiple_of",
            "ffn_dim_multiplier",
            "norm_eps",
            "rope_theta",
            "max_seq_len",
            "init_std",
        )
        return LlamaConfig(**{name: getattr(self, name) for name in names})


class XLlamaBackbone(nn.Module):
    """What trl reaches as `getattr(model, model.base_model_prefix)`: tokens -> `.last_hidden_state` (B, T, dim)."""

    def __init__(self, llama: Llama):
        super().__init__()
        self.llama = llama

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None, **kwargs: Any
    ) -> BaseModelOutputWithPast:
        _reject_unsupported(kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.llama.hidden_states(input_ids, position_ids, attention_mask))


def _backbone(config: XLlamaConfig, llama: Llama | None) -> XLlamaBackbone:
    if llama is None:
        return XLlamaBackbone(Llama(config.to_llama_config()))
    for module in llama.modules():  # keep the given weights: HF's post_init skips initialised modules
        module._is_hf_initialized = True
    return XLlamaBackbone(llama)


def _reject_unsupported(kwargs: dict[str, Any]) -> None:
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError("x_llama's HF wrapper takes input_ids, not inputs_embeds")


class XLlamaPreTrainedModel(PreTrainedModel):
    config_class = XLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The same initialisation as `Llama.reset_parameters`, module by module (HF initialises lazily)."""
        from transformers import initialization as init

        from .model import RMSNorm

        std = self.config.init_std
        if isinstance(module, nn.Linear):
            scale = (2 * self.config.n_layers) ** -0.5 if getattr(module, "is_residual_projection", False) else 1.0
            init.normal_(module.weight, mean=0.0, std=std * scale)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, Llama):
            cos, sin = module.rope_tables()
            init.copy_(module.rope_cos, cos)
            init.copy_(module.rope_sin, sin)


class XLlamaForCausalLM(XLlamaPreTrainedModel, GenerationMixin):
    """`Llama` as a transformers causal LM: `model(input_ids, attention_mask, labels) -> CausalLMOutputWithPast`.

    `.llama` is the wrapped `x_llama.Llama` (shared, not copied). HF `generate()` works without a KV cache
    (each step re-runs the prefix); x_llama's own `generate` uses the cache."""

    def __init__(self, config: XLlamaConfig, llama: Llama | None = None):
        super().__init__(config)
        self.model = _backbone(config, llama)
        self.post_init()
        self.generation_config.use_cache = False

    @classmethod
    def from_llama(cls, llama: Llama, **config_kwargs: Any) -> XLlamaForCausalLM:
        """Wrap an existing model; the parameters are shared with `llama`, not copied."""
        wrapper = cls(XLlamaConfig.from_llama_config(llama.config, **config_kwargs), llama=llama)
        return wrapper

    @property
    def llama(self) -> Llama:
        return self.model.llama

    def get_input_embeddings(self) -> nn.Embedding:
        return self.llama.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.llama.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.llama.output

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.llama.output = value

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        _reject_unsupported(kwargs)
        hidden = self.llama.hidden_states(input_ids, position_ids, attention_mask)
        logits = self.llama.output(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:  # HF convention: labels are the inputs; shift here, -100 is ignored
            loss = lm_loss(logits[:, :-1], labels[:, 1:].to(logits.device))
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> dict[str, Any]:
        return {"input_ids": input_ids, "attention_mask": attention_mask}


class XLlamaForSequenceClassification(XLlamaPreTrainedModel):
    """Backbone + a linear `score` head read at each row's last real token (a reward model, InstructGPT 3.5)."""

    def __init__(self, config: XLlamaConfig, llama: Llama | None = None):
        super().__init__(config)
        self.model = _backbone(config, llama)
        self.score = nn.Linear(config.dim, config.num_labels, bias=False)
        self.post_init()

    @property
    def llama(self) -> Llama:
        return self.model.llama

    def get_input_embeddings(self) -> nn.Embedding:
        return self.llama.tok_embeddings

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithPast:
        _reject_unsupported(kwargs)
        hidden = self.llama.hidden_states(input_ids, position_ids, attention_mask)
        scores = self.score(hidden)  # (B, T, num_labels)
        if attention_mask is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        else:  # index of the last 1 in each row (works for left and right padding)
            index = torch.arange(input_ids.shape[1], device=input_ids.device)
            last = (attention_mask.long() * (index + 1)).argmax(-1)
        logits = scores[torch.arange(input_ids.shape[0], device=input_ids.device), last]
        loss = None
        if labels is not None and self.config.num_labels == 1:
            loss = nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits)


def register() -> None:
    """Register the wrapper with the Auto classes (done on import of x_llama.hf)."""
    with contextlib.suppress(ValueError):  # already registered
        AutoConfig.register("x_llama", XLlamaConfig)
    for auto, cls in ((AutoModelForCausalLM, XLlamaForCausalLM), (AutoModelForSequenceClassification, XLlamaForSequenceClassification)):
        with contextlib.suppress(ValueError):
            auto.register(XLlamaConfig, cls)


register()
