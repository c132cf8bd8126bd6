"""Hyper-connections (Zhu et al. 2024, "Hyper-Connections", arXiv:2409.19606, ICLR 2025): the one residual stream
of a pre-norm Transformer widened into n streams, which every layer reads and writes through learnable weights.

Section 2.1, static hyper-connections (SHC). The hidden state is a matrix of n rows, the streams,
H = (h_1 ... h_n)^T in R^{n x d} (n: the expansion rate). The embedding is copied into every row,
H^0 = (h^0 ... h^0)^T, and the last matrix is summed over its rows before the final norm and the output head.
A layer T (here one pre-norm sublayer, attention or feed-forward, so the paper's layer counter is
k = 2 * block + sublayer) is wrapped by the hyper-connection matrix

    HC = [[0_{1x1}, B  ],      B   in R^{1 x n}   depth connection: sublayer output -> streams
          [A_m,     A_r]]      A_m in R^{n x 1}   width connection: streams -> sublayer input
                               A_r in R^{n x n}   width connection: streams -> streams

    h_0^T = A_m^T H            the sublayer input, a weighted sum of the streams
    H'    = A_r^T H            the streams mixed among themselves
    Ĥ     = B^T T(h_0)^T + H'  the sublayer output added to stream j with weight B_j

that is Ĥ = HC(T, H) = B^T T(H^T A_m)^T + A_r^T H.

Section 2.2, dynamic hyper-connections (DHC). The weights also depend on the streams, token by token: each
stream is normalised, projected, squashed by tanh, scaled by a small learnable scalar (s_alpha for both width
connections, s_beta for the depth connection) and added to the static weights:

    H̄      = norm(H)                                                    row by row
    B(H)   = s_beta  tanh(H̄ W_beta)^T + B      W_beta in R^{d x 1}
    A_m(H) = s_alpha tanh(H̄ W_m)      + A_m    W_m    in R^{d x 1}
    A_r(H) = s_alpha tanh(H̄ W_r)      + A_r    W_r    in R^{d x n}

so row i of A_m(H) and A_r(H), and entry i of B(H), are functions of stream i alone.

Section 2.3, initialisation. W_beta = W_m = W_r = 0 and the static weights

    [[0_{1x1},     1_{1 x n}],
     [e_{k mod n}, I_{n x n}]]

with s_alpha = s_beta = 0.01 (the paper's pseudo-code). Layer k reads stream k mod n,
keeps every stream as it is, and adds its output to every stream. Starting from n equal copies the streams therefore
stay equal, each is the pre-norm residual state (x + f(x) after every sublayer), and their sum is n times it; the
final RMSNorm removes the factor n (up to its eps), so the network starts as the pre-norm Transformer it replaces.
With n = 1 a hyper-connection starts exactly as the residual x + f(x).

In x_llama (`LlamaConfig.residual = "hyper"`, `config.hyper.rate` = n, `config.hyper.dynamic` = DHC or SHC) every
`Block` holds two `HyperConnection`s (attention, feed-forward) and takes streams (B, T, n, dim); the model expands the
embeddings with `expand_streams` before the first block and sums them with `collapse_streams` before the final norm.

Equations are cited by section, not number: their numbers were not checked against the paper here.

Deviations: norm() in the DHC is RMSNorm with a learnable gain (the paper's code uses LayerNorm; Llama has none).
The stream mixing runs in the streams' dtype with autocast off, so under bf16 autocast the residual streams stay in
float32 as the standard residual stream does; only the sublayer itself runs in bf16.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from einops import einsum, reduce, repeat
from torch import Tensor, nn

from ..config import LlamaConfig
from ..model import RMSNorm

DYNAMIC_SCALE_INIT = 0.01  # s_alpha and s_beta at initialisation (appendix J, Algorithm 2)


def expand_streams(x: Tensor, rate: int) -> Tensor:
    """H^0 = (h^0 ... h^0)^T (section 2.1): the embeddings (B, T, dim) copied into `rate` streams (B, T, n, dim)."""
    if rate < 1:
        raise ValueError(f"the expansion rate must be >= 1, got {rate}")
    if x.ndim != 3:
        raise ValueError(f"expand_streams takes hidden states (batch, length, dim), got shape {tuple(x.shape)}")
    return repeat(x, "b t d -> b t n d", n=rate)


def collapse_streams(streams: Tensor) -> Tensor:
    """The row-wise sum of the last hyper hidden matrix (section 2.1): streams (B, T, n, dim) -> (B, T, dim), what
    the final norm and the output head read."""
    if streams.ndim != 4:
        raise ValueError(f"collapse_streams takes streams (batch, length, n, dim), got shape {tuple(streams.shape)}")
    return reduce(streams, "b t n d -> b t d", "sum")


@contextmanager
def streams_precision(streams: Tensor) -> Iterator[None]:
    """Autocast off: the stream mixing runs in the streams' own dtype (float32 under bf16 autocast)."""
    with torch.autocast(device_type=streams.device.type, enabled=False):
        yield


class HyperConnection(nn.Module):
    """One hyper-connection around one sublayer (SHC, section 2.1; DHC, section 2.2; initialisation, section 2.3).

    `forward(streams, sublayer)`: streams H (B, T, n, dim) -> Ĥ = B^T sublayer(A_m^T H)^T + A_r^T H (B, T, n, dim).
    `sublayer` maps (B, T, dim) -> (B, T, dim) and includes its pre-norm (Block: attention(attention_norm(h))).

    Parameters (paper names): input_weights A_m (n,), residual_weights A_r (n, n) (row i = stream i's weights),
    output_weights B (n,); with `config.hyper.dynamic` also norm, input_projection W_m (dim,), residual_projection
    W_r (dim, n), output_projection W_beta (dim,), width_scale s_alpha and depth_scale s_beta (scalars).
    """

    def __init__(self, config: LlamaConfig, layer_index: int, sublayer_index: int):
        super().__init__()
        if sublayer_index not in (0, 1):
            raise ValueError(f"sublayer_index must be 0 (attention) or 1 (feed-forward), got {sublayer_index}")
        if layer_index < 0:
            raise ValueError(f"layer_index must be >= 0, got {layer_index}")
        if config.hyper.rate < 1:
            raise ValueError(f"hyper.rate (the number of residual streams) must be >= 1, got {config.hyper.rate}")
        self.rate, self.dim, self.dynamic = config.hyper.rate, config.dim, config.hyper.dynamic
        self.depth = 2 * layer_index + sublayer_index  # the paper's layer counter k (initialisation)
        n = self.rate
        self.input_weights = nn.Parameter(torch.empty(n))  # A_m
        self.residual_weights = nn.Parameter(torch.empty(n, n))  # A_r
        self.residual_weights.no_weight_decay = True  # the identity at init: decay would shrink the residual path
        self.output_weights = nn.Parameter(torch.empty(n))  # B
        if self.dynamic:
            self.norm = RMSNorm(config.dim, config.norm_eps)  # norm(H) of the DHC
            self.input_projection = nn.Parameter(torch.empty(config.dim))  # W_m
            self.residual_projection = nn.Parameter(torch.empty(config.dim, n))  # W_r
            self.output_projection = nn.Parameter(torch.empty(config.dim))  # W_beta
            self.width_scale = nn.Parameter(torch.empty(()))  # s_alpha
            self.depth_scale = nn.Parameter(torch.empty(()))  # s_beta
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialisation (section 2.3): A_m = e_{k mod n}, A_r = I, B = 1; W_m = W_r = W_beta = 0, s_alpha = s_beta = 0.01, norm gain 1."""
        with torch.no_grad():
            self.input_weights.zero_()
            self.input_weights[self.depth % self.rate] = 1.0
            self.residual_weights.copy_(torch.eye(self.rate))
            self.output_weights.fill_(1.0)
            if self.dynamic:
                self.norm.weight.fill_(1.0)
                self.input_projection.zero_()
                self.residual_projection.zero_()
                self.output_projection.zero_()
                self.width_scale.fill_(DYNAMIC_SCALE_INIT)
                self.depth_scale.fill_(DYNAMIC_SCALE_INIT)

    def connection_weights(self, streams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A_m, A_r, B: static (n,), (n, n), (n,); dynamic, per token, (B, T, n), (B, T, n, n), (B, T, n) (eqs. 9-12)."""
        if not self.dynamic:
            return self.input_weights, self.residual_weights, self.output_weights
        normed = self.norm(streams)  # H̄ (B, T, n, d)
        input_weights = self.width_scale * torch.tanh(normed @ self.input_projection) + self.input_weights  # (B, T, n)
        residual_weights = self.width_scale * torch.tanh(normed @ self.residual_projection) + self.residual_weights  # (B, T, n, n)
        output_weights = self.depth_scale * torch.tanh(normed @ self.output_projection) + self.output_weights  # (B, T, n)
        return input_weights, residual_weights, output_weights

    def forward(self, streams: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        self.check_streams(streams)
        with streams_precision(streams):
            input_weights, residual_weights, output_weights = (w.to(streams.dtype) for w in self.connection_weights(streams))
            sublayer_input = einsum(input_weights, streams, "... i, ... i d -> ... d")  # h_0^T = A_m^T H (B, T, d)
            kept = einsum(residual_weights, streams, "... i j, ... i d -> ... j d")  # H' = A_r^T H (B, T, n, d)
        sublayer_output = sublayer(sublayer_input)  # T(h_0) (B, T, d), under the caller's autocast
        with streams_precision(streams):
            added = einsum(output_weights, sublayer_output.to(streams.dtype), "... j, ... d -> ... j d")  # B^T T(h_0)^T
            return kept + added  # Ĥ (B, T, n, d)

    def check_streams(self, streams: Tensor) -> None:
        if streams.ndim != 4 or streams.shape[2] != self.rate or streams.shape[3] != self.dim:
            raise ValueError(
                f"hyper-connections take residual streams (batch, length, n={self.rate}, dim={self.dim}), got shape "
                f"{tuple(streams.shape)}; expand the embeddings with expand_streams(x, config.hyper.rate) before the first "
                "block and sum them with collapse_streams before the final norm"
            )

    def extra_repr(self) -> str:
        return f"rate={self.rate}, dim={self.dim}, dynamic={self.dynamic}, layer_k={self.depth}"
