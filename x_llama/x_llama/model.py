"""Llama 2 (Touvron et al. 2023, section 2.2): a pre-norm decoder-only Transformer with RMSNorm, SwiGLU,
rotary position embeddings and grouped-query attention, plus a key/value cache for decoding.

    h_l   = x_l + W_o Attn(RoPE(W_q n), RoPE(W_k n), W_v n),   n = RMSNorm(x_l)        (Block.forward)
    x_l+1 = h_l + W_2 (silu(W_1 m) * W_3 m),                   m = RMSNorm(h_l)
    logits = W_out RMSNorm(x_L)                                                         (Llama.forward)

The architecture lab (x_llama.variants, README "The architecture lab") swaps pieces of the block when the config
names them (ALiBi/NoPE, differential attention, MoE/PEER, Mixture-of-Depths, hyper-connections); the defaults
build exactly the model above.

Parameter names are Meta's (`tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1`, `output`, ...), and
the RoPE layout is Meta's interleaved one, so a Meta checkpoint loads without conversion (x_llama.hf).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from axon_shared.layers import attention

from .config import LlamaConfig
from .rope import apply_rotary, interleaved_tables, rope_cos_sin


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): y = g * x / sqrt(mean(x^2) + eps), re-scaling without re-centring.
    Normalised in float32 and cast back before the gain, as in Llama 2's reference code."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


class SwiGLU(nn.Module):
    """SwiGLU(x) = W2 (silu(W1 x) * W3 x) (Shazeer 2020), bias-free as in Llama 2; Meta's names w1 (gate), w3 (up),
    w2 (down)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class KVCache:
    """Preallocated keys and values of the *kv heads only*: k, v of shape (n_layers, B, n_kv_heads, max_len, d_head).

    Memory = 2 * n_layers * B * max_len * n_kv_heads * d_head * bytes (README, "KV-cache memory"): GQA with
    n_kv_heads = n_heads / g needs 1/g of the MHA cache. Slots [0, length) are filled; rows of a left-padded
    batch mark their pad slots False in `key_mask`, and carry their own next RoPE position (`next_position`).
    """

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int | None = None, *, dtype=torch.float32, device=None):
        max_len = config.max_seq_len if max_len is None else max_len
        if max_len > config.max_seq_len:
            raise ValueError(f"KVCache max_len={max_len} exceeds the model's max_seq_len={config.max_seq_len}")
        shape = (config.n_layers, batch_size, config.kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_mask = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self.extra: dict[str, Tensor] = {}  # per-layer state of architecture variants (Mixture-of-Depths' key masks)
        self.has_padding = False
        self.shared_positions = True  # every row's next position == length (no padding, no explicit positions)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new keys/values (B, H_kv, T, d) at slots [length, length + T) in place; return the filled
        prefix (views, no copy) of this layer. `Llama.forward` advances `length` after the last layer."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class _SlotWrite:
    """What `Llama.decode_step` hands the layers as their cache: `update` writes the one new key/value at slot
    `slot` (a (1,) tensor, so the step's graph does not change with the position) and returns all max_len slots;
    the unfilled ones are masked by the step's attention mask."""

    def __init__(self, cache: KVCache, slot: Tensor):
        self.k, self.v, self.slot = cache.k, cache.v, slot

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # one index_put_ on the whole cache (not on the view k[layer], which a compiled graph would turn into a copy
        # of the whole cache per layer): k[layer, :, :, slot] = k, with the indexed axes first
        at = (torch.tensor([layer], device=k.device), slice(None), slice(None), self.slot)
        self.k[at] = rearrange(k, "b h 1 d -> 1 b h d")
        self.v[at] = rearrange(v, "b h 1 d -> 1 b h d")
        return self.k[layer], self.v[layer]  # (B, H_kv, max_len, d)


@dataclass
class AttentionInputs:
    """What every layer's attention reads, computed once per forward by `Llama.hidden_states`."""

    cos: Tensor | None  # RoPE tables, (T, d_head) shared by the rows or (B, 1, T, d_head); None without RoPE
    sin: Tensor | None
    mask: Tensor | None  # bool, broadcastable to (B, H, T, S), True = may attend (padding); None = no padding
    is_causal: bool  # add causal order (query i sits at slot S - T + i)
    bias: Tensor | None = None  # float score bias broadcastable to (B, H, T, S) (ALiBi), or None


class Attention(nn.Module):
    """Multi-head attention with n_kv_heads key/value heads (GQA, Ainslie et al. 2023) and RoPE on q and k."""

    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.wo.is_residual_projection = True  # initialised with a smaller std (Llama.reset_parameters)

    def forward(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None) -> Tensor:
        q = rearrange(self.wq(x), "b t (h d) -> b h t d", h=self.n_heads)  # (B, H, T, d)
        k = rearrange(self.wk(x), "b t (h d) -> b h t d", h=self.n_kv_heads)  # (B, H_kv, T, d)
        v = rearrange(self.wv(x), "b t (h d) -> b h t d", h=self.n_kv_heads)
        if inputs.cos is not None:
            q, k = apply_rotary(q, inputs.cos, inputs.sin), apply_rotary(k, inputs.cos, inputs.sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # (B, H_kv, S, d), S = cached + T
        # softmax(q k^T / sqrt(d) + bias) v, grouped kv heads
        out = attention(q, k, v, inputs.mask, is_causal=inputs.is_causal, bias=inputs.bias)
        return self.wo(rearrange(out, "b h t d -> b t (h d)"))


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(RMSNorm(x)), then h + SwiGLU(RMSNorm(h)).

    The architecture lab (x_llama.variants) swaps the pieces a config names: the attention (`attention:
    differential`), the feed-forward (`ffn: moe | peer`) and the two residual connections (`residual: hyper`, where
    x is (B, T, n, dim): n streams). The default config builds exactly Llama 2's block."""

    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = make_attention(config, layer_index)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = make_feed_forward(config, layer_index)
        self.hyper_connections = make_hyper_connections(config, layer_index)  # None for the standard residual

    def forward(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None) -> Tensor:
        def attend(n: Tensor) -> Tensor:
            return self.attention(self.attention_norm(n), inputs, cache)

        def feed_forward(n: Tensor) -> Tensor:
            return self.feed_forward(self.ffn_norm(n))

        if self.hyper_connections is not None:  # x: (B, T, n, dim) residual streams
            return self.hyper_connections[1](self.hyper_connections[0](x, attend), feed_forward)
        h = x + attend(x)
        return h + feed_forward(h)


# ---- the architecture lab's factories (x_llama.variants; the modules are imported only when a config names them) --
def make_attention(config: LlamaConfig, layer_index: int) -> nn.Module:
    if config.attention == "differential":
        from .variants.differential_attention import DifferentialAttention

        return DifferentialAttention(config, layer_index)
    return Attention(config, layer_index)


def make_feed_forward(config: LlamaConfig, layer_index: int) -> nn.Module:
    if config.ffn == "moe":
        from .variants.mixture_of_experts import MoEFeedForward

        return MoEFeedForward(config, layer_index)
    if config.ffn == "peer":
        from .variants.peer import PEERFeedForward

        return PEERFeedForward(config, layer_index)
    feed_forward = SwiGLU(config.dim, config.hidden_dim)
    feed_forward.w2.is_residual_projection = True
    return feed_forward


def make_hyper_connections(config: LlamaConfig, layer_index: int) -> nn.ModuleList | None:
    if config.residual != "hyper":
        return None
    from .variants.hyper_connections import HyperConnection

    return nn.ModuleList(HyperConnection(config, layer_index, sublayer) for sublayer in (0, 1))


def make_layer(config: LlamaConfig, layer_index: int) -> nn.Module:
    """A Block, wrapped in a Mixture-of-Depths router for the routed layers (every `mod.every`-th: 1, 3, 5, ...)."""
    block = Block(config, layer_index)
    if config.router == "mod" and layer_index % config.mod.every == config.mod.every - 1:
        from .variants.mixture_of_depths import MoDBlock

        return MoDBlock(block, config, layer_index)
    return block


class Llama(nn.Module):
    """tokens (B, T) -> logits (B, T, vocab_size). See the module docstring for the equations."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(make_layer(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)  # untied from tok_embeddings
        self.activation_checkpointing = False
        cos, sin = self.rope_tables()
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, d_head), float32
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    # ---- construction -----------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """N(0, init_std) weights; residual-output projections (wo, w2) scaled by 1/sqrt(2 n_layers) (GPT-2's
        rule; Llama 2 does not publish its initialisation); RMSNorm gains 1. Then every other module with a
        `reset_parameters` (the variants' lambdas, stream weights, expert tables, BatchNorm) initialises itself."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, residual_std if getattr(module, "is_residual_projection", False) else std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for module in self.modules():
            if module is not self and not isinstance(module, nn.Linear | nn.Embedding) and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def rope_tables(self, device=None) -> tuple[Tensor, Tensor]:
        """cos, sin of m * theta_i for every position m < max_seq_len, laid out for `apply_rotary`:
        (max_seq_len, d_head) float32 each."""
        return interleaved_tables(*rope_cos_sin(self.config.max_seq_len, self.config.head_dim, self.config.rope_theta, device))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def active_parameters(self) -> int:
        """Parameters one token uses: all of them, except in sparse feed-forwards (MoE, PEER), which count the
        experts a token is routed to (their `active_parameters`)."""
        total = self.num_parameters()
        for module in self.modules():
            if module is not self and hasattr(module, "active_parameters"):
                total += module.active_parameters() - sum(p.numel() for p in module.parameters())
        return total

    def auxiliary_loss(self) -> Tensor | None:
        """The sum of the variants' weighted auxiliary losses of the last forward (MoE load balancing and z-loss,
        Mixture-of-Depths' router BCE), or None when the model has none (Llama 2) or is in eval mode."""
        losses = [m.aux_loss for m in self.modules() if getattr(m, "aux_loss", None) is not None]
        return torch.stack(losses).sum() if losses else None

    def auxiliary_metrics(self) -> dict[str, float]:
        """The variants' diagnostics of the last forward (mean over layers), e.g. MoE load, MoD predictor accuracy."""
        values: dict[str, list[float]] = {}
        for module in self.modules():
            for key, value in (getattr(module, "aux_metrics", None) or {}).items():
                values.setdefault(key, []).append(float(value))
        return {key: sum(v) / len(v) for key, v in values.items()}

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        weight = self.tok_embeddings.weight
        return KVCache(self.config, batch_size, max_len, dtype=weight.dtype, device=weight.device)

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,
        *,
        last_only: bool = False,
    ) -> Tensor:
        """Logits (B, T, V) (or (B, 1, V) with last_only). With a cache, `tokens` are the *new* tokens: the cache
        is appended to. attention_mask (B, T): 1 = real token, 0 = left padding."""
        h = self.hidden_states(tokens, positions, attention_mask, cache=cache)
        return self.output(h[:, -1:] if last_only else h)

    def hidden_states(
        self, tokens: Tensor, positions: Tensor | None = None, attention_mask: Tensor | None = None, *, cache: KVCache | None = None
    ) -> Tensor:
        """The backbone: RMSNorm(x_L), (B, T, dim), what the output head (or a reward/value head) reads."""
        self.check_tokens(tokens, cache)
        length = tokens.shape[1]
        start = cache.length if cache is not None else 0
        if attention_mask is not None:
            if attention_mask.shape != tokens.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal tokens shape {tuple(tokens.shape)}")
            attention_mask = attention_mask.to(device=tokens.device, dtype=torch.bool)
        if cache is not None and (positions is not None or (attention_mask is not None and not bool(attention_mask.all()))):
            cache.shared_positions = False
        positions = self._positions(tokens, positions, attention_mask, cache)
        shared_start = start if cache is not None and cache.shared_positions else 0
        cos = sin = None
        if self.config.position == "rope":
            cos, sin = self._rope(positions, length, shared_start)

        # Which keys each query may see (True = may attend); causal order is added by `attention`.
        mask, is_causal = None, True
        if cache is not None:
            real = attention_mask if attention_mask is not None else torch.ones_like(tokens, dtype=torch.bool)
            cache.key_mask[:, start : start + length] = real
            cache.has_padding = cache.has_padding or not bool(real.all())
            if cache.has_padding:
                mask = cache.key_mask[:, None, None, : start + length]  # (B, 1, 1, S)
            is_causal = length > 1  # one new token may see every filled slot
        elif attention_mask is not None and (torch.compiler.is_compiling() or not bool(attention_mask.all())):
            mask = attention_mask[:, None, None, :]  # (B, 1, 1, T); a compiled graph cannot look, so it always masks

        bias = self._alibi(tokens, positions, start) if self.config.position == "alibi" else None
        inputs = AttentionInputs(cos, sin, mask, is_causal, bias)

        x = self.tok_embeddings(tokens)  # (B, T, dim)
        if self.config.residual == "hyper":
            from .variants.hyper_connections import expand_streams

            x = expand_streams(x, self.config.hyper.rate)  # (B, T, n, dim): n residual streams
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, inputs, cache, use_reentrant=False)
            else:
                x = layer(x, inputs, cache)
        if self.config.residual == "hyper":
            from .variants.hyper_connections import collapse_streams

            x = collapse_streams(x)  # (B, T, dim)
        if cache is not None:
            cache.length += length
            cache.next_position = positions[:, -1] + 1 if positions is not None else cache.next_position + length
        return self.norm(x)

    # ---- one decoding step as a single graph ------------------------------------------------------------------
    def decode_step(self, tokens: Tensor, cache: KVCache, *, compile: bool = False) -> Tensor:
        """Logits (B, V) for one new token per row (tokens (B, 1)), appended to the cache: the same numbers as
        `forward(tokens, cache=cache)[:, -1]`, computed by the same layers, with shapes that do not change from step
        to step. With compile=True the step runs as one graph compiled by `torch.compile(fullgraph=True)` (the first
        call per batch size and cache length compiles, ~5-20 s on 2 CPU threads), which removes the per-operation
        Python and dispatch time that dominates a small model's decoding (README "Benchmark").

        Fixed shapes: the new key/value is written at slot `cache.length` given as a tensor, attention reads every
        one of the cache's max_len slots with the unfilled (and left-padding) slots masked, and RoPE reads each row's
        `next_position`. The checks (ids, length, positions) run here, outside the graph."""
        config = self.config
        unsupported = self.decode_step_unsupported()
        if unsupported:
            raise ValueError(
                f"decode_step runs the standard Llama block (with RoPE or NoPE); this model has {unsupported}: "
                "decode it with forward(tokens, cache=cache) (generate(..., compile=False))"
            )
        if tokens.ndim != 2 or tokens.shape[1] != 1:
            raise ValueError(f"decode_step takes one new token per row, (batch, 1); got shape {tuple(tokens.shape)}")
        self.check_tokens(tokens, cache)
        positions = cache.next_position[:, None]  # (B, 1)
        cos, sin = self._rope(positions, 1) if config.position == "rope" else (None, None)  # (B, 1, 1, d) each
        slot = torch.tensor([cache.length], device=tokens.device)
        cache.key_mask[:, cache.length] = True
        step = _compiled_step_graph(tokens.shape[0]) if compile else Llama._step_graph
        logits = step(self, tokens, cache, slot, cos, sin)
        cache.length += 1
        cache.next_position += 1
        return logits

    def decode_step_unsupported(self) -> dict[str, str]:
        """The config choices `decode_step` does not run (empty when it runs this model): it builds the standard
        block's step (softmax attention, SwiGLU, no router, one residual stream; RoPE or NoPE)."""
        runs = {"position": ("rope", "nope"), "attention": ("softmax",), "ffn": ("swiglu",), "router": ("none",), "residual": ("standard",)}
        return {name: getattr(self.config, name) for name, values in runs.items() if getattr(self.config, name) not in values}

    def _step_graph(self, tokens: Tensor, cache: KVCache, slot: Tensor, cos: Tensor | None, sin: Tensor | None) -> Tensor:
        """decode_step's tensor work: no Python decision depends on a tensor's values."""
        filled = torch.arange(cache.max_len, device=tokens.device) <= slot  # (S,): slots [0, length] hold keys
        mask = (cache.key_mask & filled)[:, None, None, :]  # (B, 1, 1, S)
        inputs = AttentionInputs(cos, sin, mask, is_causal=False)
        x = self.tok_embeddings(tokens)  # (B, 1, dim)
        writer = _SlotWrite(cache, slot)
        for layer in self.layers:
            x = layer(x, inputs, writer)
        return self.output(self.norm(x))[:, -1]  # (B, V)

    # ---- helpers ----------------------------------------------------------------------------------------------
    def check_tokens(self, tokens: Tensor, cache: KVCache | None = None) -> None:
        """Clear errors for inputs the model cannot take (instead of an index error deep inside)."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, length), got shape {tuple(tokens.shape)}; add a batch axis with tokens[None]")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be integer ids, got {tokens.dtype}")
        if tokens.shape[1] == 0:
            raise ValueError("empty input: tokens has length 0; give at least one token (e.g. the BOS id)")
        total = tokens.shape[1] + (cache.length if cache is not None else 0)
        limit = cache.max_len if cache is not None else self.config.max_seq_len
        if total > limit:
            what = f"cache max_len={limit}" if cache is not None else f"max_seq_len={limit}"
            raise ValueError(f"sequence of {total} tokens exceeds the model's {what}; truncate the input or use a larger config")
        if cache is not None and tokens.shape[0] != cache.batch_size:
            raise ValueError(f"batch size {tokens.shape[0]} does not match the KV cache's batch size {cache.batch_size}")
        # the id range needs the values: checked in eager mode, skipped inside a compiled graph (where it would break the
        # graph; nn.Embedding still refuses an out-of-range id there, with a less helpful message)
        if tokens.device.type != "meta" and tokens.numel() and not torch.compiler.is_compiling():
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"token ids must lie in [0, vocab_size={self.config.vocab_size}); got min {low}, max {high}. "
                    "Was the text encoded with a different tokenizer, or padded with -1?"
                )

    def _positions(self, tokens: Tensor, positions: Tensor | None, mask: Tensor | None, cache: KVCache | None) -> Tensor | None:
        """Per-row RoPE positions (B, T), or None when all rows share them (start .. start+T-1, a table slice)."""
        batch, length = tokens.shape
        if positions is not None:
            positions = positions.to(tokens.device).long()
            return positions.expand(batch, length) if positions.ndim == 1 or positions.shape[0] == 1 else positions
        offset = cache.next_position[:, None] if cache is not None else 0
        if cache is not None and cache.shared_positions:
            return None  # rows share positions length .. length + T - 1
        if mask is not None:  # left padding: the first real token of each row is at position 0
            return (offset + mask.long().cumsum(1) - 1).clamp(min=0)
        if cache is not None:
            return offset + torch.arange(length, device=tokens.device)
        return None

    def _alibi(self, tokens: Tensor, positions: Tensor | None, start: int) -> Tensor:
        """ALiBi's bias -m_h (i - j) (x_llama.variants.alibi): (1, H, T, S) over cache slots, or (B, H, T, T) from
        explicit per-row positions without a cache. Slot distances equal position distances: a row's tokens are
        contiguous (left padding only)."""
        from .variants.alibi import alibi_bias, alibi_slopes

        slopes = alibi_slopes(self.config.n_heads).to(tokens.device)
        if positions is not None and start == 0:
            return alibi_bias(slopes, positions, positions)
        slots = torch.arange(start + tokens.shape[1], device=tokens.device)[None]  # (1, S)
        return alibi_bias(slopes, slots[:, start:], slots)

    def _rope(self, positions: Tensor | None, length: int, start: int = 0) -> tuple[Tensor, Tensor]:
        weight = self.tok_embeddings.weight
        if self.rope_cos.dtype != torch.float32 or (self.rope_cos.is_meta and not weight.is_meta):
            # model.to(bfloat16) also casts buffers, and meta-device loading leaves them empty: rebuild in fp32
            self.rope_cos, self.rope_sin = self.rope_tables(weight.device)
        if positions is None:
            return self.rope_cos[start : start + length], self.rope_sin[start : start + length]  # (T, d), shared by all rows
        if positions.device.type != "meta" and not torch.compiler.is_compiling() and int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(f"position {int(positions.max())} exceeds max_seq_len={self.config.max_seq_len} (RoPE table size)")
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (B, 1, T, d)


def _compiled_step_graph(rows: int):
    """`Llama._step_graph` compiled for steps of `rows` rows, under `decode_mm_limits(rows)`."""
    return _compiled_step_graph_with(tuple(decode_mm_limits(rows).items()))


@functools.cache
def _compiled_step_graph_with(limits: tuple[tuple[str, int], ...]):
    """`Llama._step_graph` compiled once per process and set of limits (inductor recompiles it for each new model
    shape, batch size and cache length; models of one shape share it: their weights are inputs of the graph, not
    constants, so a policy being trained, as in PPO, decodes with its current weights).

    inductor's `decompose_mm_pass` turns each (M, K) x (K, N) product of decoding, M = the batch size, into a
    multiply and a sum that its own kernel spreads over the threads; the matrix library runs such a thin product on
    one thread, and a decoding step is mostly the time to read the weights. `decode_mm_limits` says which products.

    `recompile_limit` raises dynamo's default of 8 graphs per function, past which a fullgraph compile fails outright:
    a server compiles one graph per batch size (4 at compile_max_rows 8), generate one per rounded cache length."""
    limits = dict(limits)
    options = {"post_grad_fusion_options": {"decompose_mm_pass": limits}}  # in inductor's cache key
    compiled = torch.compile(Llama._step_graph, fullgraph=True, dynamic=False, options=options, recompile_limit=64)

    def step(*args):
        with mm_pass_limits(limits):  # a call compiles when it meets a new shape
            return compiled(*args)

    return step


def decode_mm_limits(rows: int) -> dict[str, int]:
    """The `decompose_mm_pass` limits of a compiled decoding step of `rows` rows: products of up to 16 rows (the
    batch) with up to 16,384 outputs at one row, so the output layer is included, and up to 2,048 (inductor's default)
    at more rows, where the output layer runs faster as a matrix-library product. inductor's own CPU limits are 1 row
    and 2,048 outputs. Graph time, `cpu` preset (4,096-word output layer), 192-slot cache, 2 threads, medians of
    7 x 50 steps, three runs each, 2026-12-05 (ms; N <= 16,384 / N <= 2,048): batch 1 0.87-0.92 / 0.92-1.00, batch 2
    1.27-1.45 / 1.24-1.34, batch 4 1.59-1.64 / 1.52-1.68, batch 8 2.40-2.48 / 2.13-2.49, batch 16 4.13-4.24 /
    3.55-3.59. Decomposing 24 or 32 rows is slower than the matrix library (batch 32: 6.5 against 4.1-4.3 ms)."""
    return {"cpu_max_first_dimension_decomposition": 16, "cpu_max_other_dimension_decomposition": 16384 if rows == 1 else 2048}


def decode_compile_options(rows: int) -> dict:
    """inductor options that give a decoding graph of `rows` rows the same limits (for a reference model compiled
    under `mm_pass_limits(decode_mm_limits(rows))`, as the benchmarks do)."""
    return {"post_grad_fusion_options": {"decompose_mm_pass": decode_mm_limits(rows)}}


@contextlib.contextmanager
def mm_pass_limits(limits: dict[str, int]):
    """Compile with these `decompose_mm_pass` limits. inductor (torch 2.13, fx_passes/decompose_mem_bound_mm.py) reads
    the pass's size limits once, when it imports the pass's module, not from each compile's options, so they are set
    on the module here and restored after: other graphs of the process (compiled training, where a product with 16
    rows is not memory-bound) keep the defaults. The compile options carry the same limits, which puts them in
    inductor's cache key: a graph cached under other limits is not reused."""
    from torch._inductor.fx_passes import decompose_mem_bound_mm as mm_pass

    saved = {name: getattr(mm_pass, name) for name in limits}
    for name, value in limits.items():
        setattr(mm_pass, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(mm_pass, name, value)


def lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy -1/N sum log p(x_t+1 | x_<=t), in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
