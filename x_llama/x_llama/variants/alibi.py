"""ALiBi: Attention with Linear Biases (Press, Smith & Lewis 2022, "Train Short, Test Long").

No position embedding is added anywhere; instead every attention score is penalised linearly in the distance
between query i and key j (section 3, the equation in Figure 3):

    softmax(q_i K^T / sqrt(d) + m_h * [-(i - 1), ..., -2, -1, 0])          (keys j <= i)

i.e. bias_h(i, j) = -m_h (i - j), with one fixed, not learned, slope m_h per head h = 1..H: the geometric sequence
that starts at 2^(-8/H) and has that same ratio, m_h = 2^(-8h/H) (section 3: for 8 heads 1/2, 1/4, ..., 1/256).
For a head count that is not a power of 2 the paper's code takes the 2^floor(log2 H) slopes of the closest smaller
power of two, then fills the rest with every other slope of twice that count (the slopes interleaved between
the first ones): `alibi_slopes`.

The paper's claim is length extrapolation: a model trained on L tokens evaluated at 2L or 4L keeps its
perplexity, because the bias, unlike learned or sinusoidal embeddings, is defined for every distance.

In x_llama (`LlamaConfig.position = "alibi"`) the bias is built once per forward in `Llama.hidden_states` and
handed to every layer's attention (`AttentionInputs.bias`); q and k are not rotated. Distances are measured in
KV-cache slots, which equal position differences because each row's tokens sit contiguously (left padding).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def alibi_slopes(n_heads: int) -> Tensor:
    """The per-head slopes m_1..m_H, (H,) float32 (section 3 and the paper's rule for non-powers of 2)."""
    if n_heads <= 0:
        raise ValueError(f"n_heads must be positive, got {n_heads}")

    def geometric(count: int) -> list[float]:  # 2^(-8/count), 2^(-16/count), ..., 2^(-8)
        start = 2.0 ** (-8.0 / count)
        return [start ** (h + 1) for h in range(count)]

    power = 2 ** math.floor(math.log2(n_heads))
    slopes = geometric(power)
    if power < n_heads:  # the remaining heads take the odd-indexed slopes of the 2 * power sequence
        slopes += geometric(2 * power)[0::2][: n_heads - power]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: Tensor, query_positions: Tensor, key_positions: Tensor) -> Tensor:
    """bias_h(i, j) = -m_h (pos_i - pos_j): (B, H, T, S) float32 from slopes (H,), query positions (B, T) and key
    positions (B, S) (B may be 1). Future keys (j > i) get a positive bias here; the causal mask removes them."""
    distance = query_positions[:, :, None].float() - key_positions[:, None, :].float()  # (B, T, S)
    return -slopes.to(distance.device)[None, :, None, None] * distance[:, None]  # (B, H, T, S)
