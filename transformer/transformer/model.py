"""The Transformer encoder-decoder (Vaswani et al. 2017, section 3), with an incremental-decoding cache.

    src (B, S) --embed*sqrt(d)+PE--> Encoder (N x [self-attn, FFN]) --> memory (B, S, d)
    tgt_in (B, T) --embed*sqrt(d)+PE--> Decoder (N x [causal self-attn, cross-attn on memory, FFN])
                                         --> x W_emb^T --> logits (B, T, V)

Masks follow axon_shared's convention: boolean, True = may attend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from axon_shared.layers import Dropout, attention, padding_mask, sinusoidal_embedding

from .config import TransformerConfig


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)  (section 3.2.2).

    The h per-head projections d_model -> d_k are stored side by side in one d_model x d_model Linear each
    (with biases, like torch.nn.MultiheadAttention). Keys and values are projected by `project_kv`, separately
    from queries, so the decoder can cache them (self-attention) or compute them once per source (cross-attention).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _split(self, x: Tensor) -> Tensor:
        return rearrange(x, "b t (h d) -> b h t d", h=self.n_heads)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, S, d_model) -> keys, values (B, h, S, d_k)."""
        return self._split(self.k_proj(x)), self._split(self.v_proj(x))

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor | None = None, *, is_causal: bool = False) -> Tensor:
        """x: queries (B, T, d_model); kv: projected keys/values (B, h, S, d_k); mask broadcastable to (B, h, T, S)."""
        q = self._split(self.q_proj(x))
        out = attention(q, *kv, mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(rearrange(out, "b h t d -> b t (h d)"))  # Concat(head_1..head_h) W^O


class FeedForward(nn.Module):
    """FFN(x) = W2 act(W1 x + b1) + b2, applied at every position alike (section 3.3, eq. 2; ReLU in the paper,
    GELU as an option)."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str = "relu"):
        super().__init__()
        activations = {"relu": nn.ReLU, "gelu": nn.GELU}
        if activation not in activations:
            raise ValueError(f"activation must be one of {sorted(activations)}, got {activation!r}")
        self.linear1 = nn.Linear(d_model, d_ff)
        self.activation = activations[activation]()
        self.linear2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.activation(self.linear1(x)))


class SublayerConnection(nn.Module):
    """Residual + LayerNorm around a sublayer (section 3.1 / 5.4).

    post-norm (paper): LayerNorm(x + Dropout(Sublayer(x)));  pre-norm: x + Dropout(Sublayer(LayerNorm(x))).
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)
        self.norm_first = config.norm_first

    def forward(self, x: Tensor, sublayer) -> Tensor:
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(config.d_model, config.n_heads, config.attention_dropout)
        self.ffn = FeedForward(config.d_model, config.d_ff, activation=config.activation)
        self.sub_attn, self.sub_ffn = SublayerConnection(config), SublayerConnection(config)

    def forward(self, x: Tensor, src_mask: Tensor) -> Tensor:
        x = self.sub_attn(x, lambda h: self.self_attn(h, self.self_attn.project_kv(h), src_mask))
        return self.sub_ffn(x, self.ffn)


@dataclass
class DecoderCache:
    """Incremental-decoding state: per layer, the self-attention keys/values of the tokens decoded so far
    (B, h, t, d_k), and the cross-attention keys/values of the memory (B, h, S, d_k), computed once."""

    self_kv: list[tuple[Tensor, Tensor] | None]
    cross_kv: list[tuple[Tensor, Tensor]]
    src_mask: Tensor  # (B, 1, 1, S)
    length: int = 0  # tokens decoded so far = position of the next token

    def select(self, index: Tensor, *, cross: bool = True) -> DecoderCache:
        """Keep / reorder batch rows (beam search reorders hypotheses; finished sentences are dropped)."""
        pick = lambda kv: (kv[0].index_select(0, index), kv[1].index_select(0, index))
        return DecoderCache(
            self_kv=[None if kv is None else pick(kv) for kv in self.self_kv],
            cross_kv=[pick(kv) for kv in self.cross_kv] if cross else self.cross_kv,
            src_mask=self.src_mask.index_select(0, index) if cross else self.src_mask,
            length=self.length,
        )


class DecoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(config.d_model, config.n_heads, config.attention_dropout)
        self.cross_attn = MultiHeadAttention(config.d_model, config.n_heads, config.attention_dropout)
        self.ffn = FeedForward(config.d_model, config.d_ff, activation=config.activation)
        self.sub_self, self.sub_cross, self.sub_ffn = (SublayerConnection(config) for _ in range(3))

    def forward(
        self,
        x: Tensor,
        memory_kv: tuple[Tensor, Tensor],
        src_mask: Tensor,
        past_kv: tuple[Tensor, Tensor] | None = None,
        *,
        use_cache: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """x (B, T, d). Without a cache: causal self-attention over x. With use_cache: x holds the newest
        positions only, their keys/values are appended to past_kv, and the new (k, v) is returned."""
        new_kv = None

        def self_attention(h: Tensor) -> Tensor:
            nonlocal new_kv
            k, v = self.self_attn.project_kv(h)
            if past_kv is not None:
                k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
            if use_cache:
                new_kv = (k, v)
            # queries are the last T of the k.shape[2] positions: causal over the whole history
            return self.self_attn(h, (k, v), is_causal=h.shape[1] > 1)

        x = self.sub_self(x, self_attention)
        x = self.sub_cross(x, lambda h: self.cross_attn(h, memory_kv, src_mask))  # source padding mask only
        return self.sub_ffn(x, self.ffn), new_kv


class Transformer(nn.Module):
    """`model(src, tgt_in) -> logits (B, T, V)`; src and tgt_in are right-padded with config.pad_id."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        # One matrix for source embeddings, target embeddings and the pre-softmax projection (section 3.4).
        self.embedding = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_id)
        self.dropout = Dropout(config.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_decoder_layers))
        # pre-norm needs a final LayerNorm on each stack's output; post-norm already ends in one
        self.encoder_norm = nn.LayerNorm(d, eps=config.layer_norm_eps) if config.norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d, eps=config.layer_norm_eps) if config.norm_first else nn.Identity()
        self.register_buffer("positions", sinusoidal_embedding(torch.arange(config.max_len), d), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform matrices, zero biases; embeddings N(0, d^-1/2) so that embedding * sqrt(d) has unit scale."""
        for name, p in self.named_parameters():
            if name == "embedding.weight":
                nn.init.normal_(p, std=self.config.d_model**-0.5)
                with torch.no_grad():
                    p[self.config.pad_id].zero_()
            elif p.dim() > 1:
                nn.init.xavier_uniform_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    @property
    def output_weight(self) -> Tensor:
        """The pre-softmax weight: the embedding matrix itself (V, d), not a copy."""
        return self.embedding.weight

    # ---- pieces ---------------------------------------------------------------------------------------------
    def embed(self, tokens: Tensor, offset: int = 0) -> Tensor:
        """Dropout(Embedding(tokens) * sqrt(d_model) + PE[offset:offset+T])  (sections 3.4, 3.5, 5.4)."""
        length = tokens.shape[1]
        if offset + length > self.config.max_len:
            raise ValueError(
                f"sequence of {offset + length} tokens exceeds max_len={self.config.max_len}; truncate the input "
                f"(translate/evaluate do) or build the model with a larger --model.max_len"
            )
        x = self.embedding(tokens) * math.sqrt(self.config.d_model) + self.positions[offset : offset + length].to(
            self.embedding.weight.dtype
        )
        return self.dropout(x)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) -> memory (B, S, d), src_mask (B, 1, 1, S) (True at real tokens)."""
        src_mask = padding_mask(src, self.config.pad_id)
        x = self.embed(src)
        for layer in self.encoder_layers:
            x = layer(x, src_mask)
        return self.encoder_norm(x), src_mask

    def decode(self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor) -> Tensor:
        """Teacher-forced decoder: tgt_in (B, T) -> hidden states (B, T, d)."""
        x = self.embed(tgt_in)
        for layer in self.decoder_layers:
            x, _ = layer(x, layer.cross_attn.project_kv(memory), src_mask)
        return self.decoder_norm(x)

    def project(self, hidden: Tensor) -> Tensor:
        """Pre-softmax linear transformation with the shared embedding matrix: (.., d) -> (.., V)."""
        return hidden @ self.output_weight.t()

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        memory, src_mask = self.encode(src)
        return self.project(self.decode(tgt_in, memory, src_mask))

    # ---- incremental decoding -------------------------------------------------------------------------------
    def start_cache(self, memory: Tensor, src_mask: Tensor) -> DecoderCache:
        """Cross-attention keys/values of every decoder layer, computed once per source."""
        return DecoderCache(
            self_kv=[None] * len(self.decoder_layers),
            cross_kv=[layer.cross_attn.project_kv(memory) for layer in self.decoder_layers],
            src_mask=src_mask,
        )

    def decode_step(self, tokens: Tensor, cache: DecoderCache) -> Tensor:
        """Feed the next token(s) (B, t) at positions cache.length..; updates the cache in place;
        returns logits (B, t, V). Equal to the full forward pass at those positions."""
        x = self.embed(tokens, offset=cache.length)
        for i, layer in enumerate(self.decoder_layers):
            x, cache.self_kv[i] = layer(x, cache.cross_kv[i], cache.src_mask, cache.self_kv[i], use_cache=True)
        cache.length += tokens.shape[1]
        return self.project(self.decoder_norm(x))
