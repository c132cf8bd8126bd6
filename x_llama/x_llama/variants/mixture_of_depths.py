"""Mixture-of-Depths (Raposo, Ritter, Richards, Lillicrap, Humphreys & Santoro 2024, "Mixture-of-Depths:
Dynamically allocating compute in transformer-based language models", arXiv:2404.02258).

A routed block processes only a fixed share of a sequence's tokens; the others skip it along the residual
stream. With a capacity C (a fraction of the T tokens here, 12.5% in the paper) the compute of the block is
known in advance, unlike early-exit schemes, because the routing is "expert-choice": the block picks its tokens.

Router (section 3.4): one scalar weight per token, a linear read-out of the residual stream,

    r_i = w^T x_i                                                            (section 3.4)

and the block f (attention + MLP, without its residual) runs on the top-k tokens by r, k = ceil(C T), i.e. those
above the percentile P_beta(R) of the sequence's router weights, beta = 1 - k / T:

    x_i' = r_i f_i(X~) + x_i     if r_i > P_beta(R)      (X~: the selected tokens, in their original order)
    x_i' = x_i                   otherwise                                   (eq. 1)

The product with r_i puts the router on the gradient path of the language-modelling loss. Our `Block` computes
x + f(x), so `MoDBlock` writes eq. 1 as x_i + r_i (block(X~)_i - x_i). The selected tokens attend among
themselves with their original positions (RoPE angles, ALiBi distances) and causal order (`select_tokens`).

Causal sampling (section 3.5): top-k over the whole sequence looks at future tokens, which autoregressive
sampling cannot do. The paper gives two ways to let each token decide alone at inference, both trained with a
binary cross-entropy against the top-k membership y_i = 1[i in top-k]:

    "loss":       L = BCE(sigmoid(r_i), y_i);            at inference, route i iff sigmoid(r_i) > 0.5 (r_i > 0)
    "predictor":  p_i = MLP(stop_gradient(x_i)),  L = BCE(sigmoid(p_i), y_i);   route i iff p_i > 0

The first auxiliary loss also shapes the router (and, through it, the stream); the predictor's loss reaches only
the predictor. Either is weighted by `config.mod.aux_loss_weight` and added to the training loss
(`Llama.auxiliary_loss`).

At inference (eval mode or with a KV cache) `MoDBlock` runs the block on every new token (decode steps are one
token long) but hides the routed-out ones: their keys are masked in this layer, now and in every later decode
step (a per-layer key mask in `KVCache.extra`), and their output is x unchanged. So the block's result for a
routed-in token is what the block would compute on the routed-in tokens alone, and cached decoding equals the
uncached forward. With hyper-connections (x of shape (B, T, n, dim)) the router and predictor read the sum of
the n streams, and a token is routed with all its streams.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..config import LlamaConfig
from ..model import AttentionInputs, KVCache

PREDICTOR_HIDDEN_FRACTION = 4  # the causal predictor's hidden size is dim / 4 (the paper only says "small MLP")
CAPACITY_ROUNDING_SLACK = 1e-6  # ceil(0.07 * 100) must be 7, not 8 (0.07 * 100 = 7.000000000000001 in floats)


def tokens_per_sequence(capacity: float, length: int) -> int:
    """k = ceil(capacity * T), at least 1: how many of a sequence's T tokens a routed block processes."""
    return max(1, math.ceil(capacity * length - CAPACITY_ROUNDING_SLACK))


def per_token(values: Tensor, like: Tensor) -> Tensor:
    """(B, T) -> (B, T, 1, ...) with as many trailing singleton dims as `like` (B, T, ...) has, to broadcast."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x (B, T, *rest), index (B, k) -> (B, k, *rest): the tokens `index` of each row, with all trailing dims."""
    expanded = per_token(index, x).expand(*index.shape, *x.shape[2:])
    return x.gather(1, expanded)


def scatter_tokens(x: Tensor, index: Tensor, values: Tensor) -> Tensor:
    """A copy of x (B, T, *rest) with the tokens `index` (B, k) replaced by values (B, k, *rest)."""
    expanded = per_token(index, x).expand(*index.shape, *x.shape[2:])
    return x.scatter(1, expanded, values)


def _gather_table_rows(table: Tensor, index: Tensor) -> Tensor:
    """RoPE table (T, d) shared by the rows, or (B or 1, 1, T, d) per row -> (B, 1, k, d) at positions index (B, k)."""
    if table.ndim == 2:
        return rearrange(table[index], "b k d -> b 1 k d")
    if table.ndim != 4 or table.shape[1] != 1:
        raise ValueError(f"RoPE tables must be (T, d_head) or (B, 1, T, d_head), got shape {tuple(table.shape)}")
    table = table.expand(index.shape[0], -1, -1, -1)  # (B, 1, T, d)
    rows = rearrange(index, "b k -> b 1 k 1").expand(-1, 1, -1, table.shape[-1])  # (B, 1, k, d)
    return table.gather(2, rows)


def _gather_slots(scores: Tensor, index: Tensor, length: int, name: str) -> Tensor:
    """A mask or bias broadcastable to (B, H, T, T) -> (B, H', k', k'') on the selected query rows and key columns;
    axes of size 1 (broadcast) stay 1, axes of size T are gathered at index (B, k)."""
    if scores.ndim > 4:
        raise ValueError(f"AttentionInputs.{name} must broadcast to (B, H, T, S), got shape {tuple(scores.shape)}")
    scores = scores.reshape((1,) * (4 - scores.ndim) + tuple(scores.shape))
    batch, count = index.shape
    scores = scores.expand(batch, -1, -1, -1)  # (B, H or 1, T or 1, S or 1): the rows differ in their selections
    for axis in (2, 3):
        size = scores.shape[axis]
        if size == 1 and length != 1:
            continue
        if size != length:
            raise ValueError(
                f"AttentionInputs.{name} has {size} slots on axis {axis} but the sequence has {length} tokens: "
                "select_tokens works on an uncached forward (S = T); route with a cache through MoDBlock's causal path"
            )
        shape = [batch, scores.shape[1], scores.shape[2], scores.shape[3]]
        shape[axis] = count
        view = index[:, None, :, None] if axis == 2 else index[:, None, None, :]
        scores = scores.gather(axis, view.expand(shape))
    return scores


def select_tokens(inputs: AttentionInputs, index: Tensor, length: int) -> AttentionInputs:
    """The AttentionInputs of the subsequence index (B, k) (sorted positions) of an uncached length-T forward.

    RoPE tables keep the selected tokens' own positions (cos/sin rows, (B, 1, k, d)); padding masks and ALiBi
    biases keep their rows and columns of the selected slots ((B, H', k, k), where a broadcast axis stays 1). The
    causal flag is unchanged: with sorted indices, selected query i sees selected key j iff j <= i in the
    original order too.
    """
    if index.ndim != 2:
        raise ValueError(f"index must be (batch, k) token positions, got shape {tuple(index.shape)}")
    cos = sin = None
    if inputs.cos is not None:
        cos, sin = _gather_table_rows(inputs.cos, index), _gather_table_rows(inputs.sin, index)
    mask = _gather_slots(inputs.mask, index, length, "mask") if inputs.mask is not None else None
    bias = _gather_slots(inputs.bias, index, length, "bias") if inputs.bias is not None else None
    return AttentionInputs(cos, sin, mask, inputs.is_causal, bias)


class MoDBlock(nn.Module):
    """A Block behind a Mixture-of-Depths router (eq. 1); same contract as Block: forward(x, inputs, cache).

    Training (no cache): the top ceil(capacity T) tokens of each sequence by router weight go through the block;
    the auxiliary BCE of `config.mod.sampling` is set in `aux_loss`. Eval or cached decoding: each token is routed
    by the causal rule (section 3.5) and the routed-out tokens are hidden from this layer's attention.
    """

    def __init__(self, block: nn.Module, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.block = block
        self.layer_index = layer_index
        self.dim = config.dim
        self.capacity = config.mod.capacity
        self.sampling = config.mod.sampling
        self.aux_loss_weight = config.mod.aux_loss_weight
        self.router = nn.Linear(config.dim, 1, bias=False)  # r_i = w^T x_i
        self.predictor: nn.Module | None = None
        if self.sampling == "predictor":
            hidden = max(1, config.dim // PREDICTOR_HIDDEN_FRACTION)
            self.predictor = nn.Sequential(nn.Linear(config.dim, hidden, bias=False), nn.SiLU(), nn.Linear(hidden, 1, bias=False))
        self.aux_loss: Tensor | None = None
        self.aux_metrics: dict[str, float] = {}  # training: how often the causal rule agrees with top-k membership

    @property
    def cache_key(self) -> str:
        """Where this layer's key mask lives in KVCache.extra."""
        return f"mod{self.layer_index}"

    def forward(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None) -> Tensor:
        if x.ndim not in (3, 4) or x.shape[-1] != self.dim:
            raise ValueError(
                f"MoDBlock expects x of shape (B, T, {self.dim}) or (B, T, n_streams, {self.dim}) with hyper-connections, "
                f"got {tuple(x.shape)}"
            )
        router_input = x.sum(dim=2) if x.ndim == 4 else x  # (B, T, dim): the streams' sum with hyper-connections
        router_weights = rearrange(self.router(router_input), "b t 1 -> b t")  # r_i, (B, T)
        if self.training and cache is None:
            return self.forward_top_k(x, router_input, router_weights, inputs)
        self.aux_loss, self.aux_metrics = None, {}
        return self.forward_causal(x, router_input, router_weights, inputs, cache)

    def causal_logits(self, router_input: Tensor, router_weights: Tensor) -> Tensor:
        """Each token's own routing logit (section 3.5): r_i ("loss") or MLP(stop_gradient(x_i)) ("predictor"), (B, T)."""
        if self.predictor is None:
            return router_weights
        return rearrange(self.predictor(router_input.detach()), "b t 1 -> b t")

    def forward_top_k(self, x: Tensor, router_input: Tensor, router_weights: Tensor, inputs: AttentionInputs) -> Tensor:
        """Expert-choice routing (eq. 1): the block runs on the top-k tokens of each sequence, in their order."""
        length = x.shape[1]
        count = tokens_per_sequence(self.capacity, length)
        chosen = router_weights.topk(count, dim=1).indices.sort(dim=1).values  # (B, k), original order
        selected = gather_tokens(x, chosen)  # (B, k, ...)
        processed = self.block(selected, select_tokens(inputs, chosen, length), None)  # x~ + f(x~)
        weights = per_token(router_weights.gather(1, chosen), selected)  # r_i, (B, k, 1, ...)
        out = scatter_tokens(x, chosen, selected + weights * (processed - selected))  # x_i + r_i f_i(x~)

        # section 3.5: the causal router learns to predict top-k membership
        targets = torch.zeros_like(router_weights, dtype=torch.float32).scatter(1, chosen, 1.0)  # y_i, (B, T)
        logits = self.causal_logits(router_input, router_weights).float()
        self.aux_loss = self.aux_loss_weight * F.binary_cross_entropy_with_logits(logits, targets)
        if not torch.compiler.is_compiling():  # a host read: skipped inside a compiled graph
            self.aux_metrics = {"mod_causal_accuracy": float(((logits > 0) == targets.bool()).float().mean())}
        return out

    def forward_causal(
        self, x: Tensor, router_input: Tensor, router_weights: Tensor, inputs: AttentionInputs, cache: KVCache | None
    ) -> Tensor:
        """Causal routing (section 3.5): token i is routed iff its logit > 0; routed-out tokens are no keys of this
        layer (masked, now and in later decode steps) and keep x_i."""
        routed = self.causal_logits(router_input, router_weights) > 0  # (B, T)
        if cache is None:
            visible = routed  # (B, S = T)
        else:
            visible = self.remember_routing(cache, routed)  # (B, S = cached + T)
        mask = rearrange(visible, "b s -> b 1 1 s")
        if inputs.mask is not None:
            mask = inputs.mask & mask  # keep the padding mask
        processed = self.block(x, dataclasses.replace(inputs, mask=mask), cache)
        weights = per_token(router_weights, x)
        return torch.where(per_token(routed, x), x + weights * (processed - x), x)

    def remember_routing(self, cache: KVCache, routed: Tensor) -> Tensor:
        """Write the new tokens' routing into this layer's key mask in cache.extra (B, max_len); return the mask of the
        filled slots (B, cached + T)."""
        start, batch = cache.length, routed.shape[0]
        keys = cache.extra.get(self.cache_key)
        if keys is None:
            if start > 0:
                raise ValueError(
                    f"the KV cache holds {start} tokens but no Mixture-of-Depths key mask for layer {self.layer_index} "
                    f"(cache.extra[{self.cache_key!r}]): it was filled or rebuilt without it; prefill a new cache "
                    "with this model (Llama.new_cache)"
                )
            keys = torch.zeros(batch, cache.max_len, dtype=torch.bool, device=routed.device)
            cache.extra[self.cache_key] = keys
        if keys.shape != (batch, cache.max_len):
            raise ValueError(
                f"cache.extra[{self.cache_key!r}] has shape {tuple(keys.shape)}, expected (batch={batch}, max_len={cache.max_len})"
            )
        keys[:, start : start + routed.shape[1]] = routed
        return keys[:, : start + routed.shape[1]]
