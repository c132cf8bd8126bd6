"""RMSNorm and SwiGLU (x_llama.model) against torch.nn and their formulas."""

import torch
from torch.testing import assert_close

from x_llama import RMSNorm, SwiGLU


def test_rmsnorm_matches_torch():
    torch.manual_seed(0)
    ours, ref = RMSNorm(32, eps=1e-5), torch.nn.RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    x = torch.randn(4, 7, 32) * 3
    assert_close(ours(x), ref(x))


def test_rmsnorm_normalises_in_float32_for_bf16_input():
    x = torch.randn(2, 64).bfloat16() * 100
    out = RMSNorm(64)(x)
    assert out.dtype == torch.float32  # weight is fp32: output promotes, as Llama's reference code does
    expected = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16().float()
    assert_close(out, expected)


def test_swiglu_matches_explicit_formula():
    torch.manual_seed(0)
    ff = SwiGLU(8, 24)
    x = torch.randn(2, 3, 8)
    gate = x @ ff.w1.weight.T
    expected = (gate * torch.sigmoid(gate) * (x @ ff.w3.weight.T)) @ ff.w2.weight.T
    assert_close(ff(x), expected, atol=1e-6, rtol=1e-5)
    assert all(m.bias is None for m in (ff.w1, ff.w2, ff.w3))
