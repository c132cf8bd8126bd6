"""The UNet: shapes, the paper's parameter count, equality with diffusers' UNet2DModel, clear errors."""

import pytest
import torch
from diffusers import UNet2DModel
from torch.testing import assert_close

from axon_shared import EMA, ConfigError
from axon_shared.training import count_parameters
from dali_ddpm.config import UNetConfig
from dali_ddpm.convert import diffusers_unet_kwargs, from_diffusers_state_dict, to_diffusers_state_dict
from dali_ddpm.model import UNet


def test_cifar10_parameter_count_is_the_papers_35_7m():
    n = count_parameters(UNet(UNetConfig.from_preset("cifar10")))
    assert abs(n - 35.7e6) / 35.7e6 < 0.01
    assert n == 35_746_307  # google/ddpm-cifar10-32 has exactly this many


@pytest.mark.parametrize("preset", ["tiny", "cpu"])
def test_output_shape_and_zero_init(preset):
    cfg = UNetConfig.from_preset(preset)
    model = UNet(cfg)
    x = torch.randn(3, cfg.in_channels, cfg.image_size, cfg.image_size)
    out = model(x, torch.tensor([0, 17, 99]))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv: eps_theta starts at 0


@pytest.mark.parametrize("preset", ["tiny", "cpu"])
def test_unet_equals_diffusers_unet2dmodel(preset):
    """Same layout, weights converted tensor by tensor: the outputs agree to float32 rounding."""
    cfg = UNetConfig.from_preset(preset)
    torch.manual_seed(0)
    ours = UNet(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.05)  # non-zero everywhere, so the zero-initialised layers are exercised too
    theirs = UNet2DModel(**diffusers_unet_kwargs(cfg)).eval()
    theirs.load_state_dict(to_diffusers_state_dict(ours.state_dict()), strict=True)
    x = torch.randn(4, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.tensor([0, 3, 500, 999])
    with torch.no_grad():
        got, expected = ours(x, t), theirs(x, t).sample
    assert expected.abs().mean() > 1e-2
    assert_close(got, expected, atol=1e-5, rtol=1e-4)
    back = from_diffusers_state_dict(theirs.state_dict(), cfg)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back[name], tensor), name


def test_cifar10_layout_matches_google_ddpm_cifar10_32_config():
    kwargs = diffusers_unet_kwargs(UNetConfig.from_preset("cifar10"))
    assert kwargs["block_out_channels"] == (128, 256, 256, 256)
    assert kwargs["down_block_types"] == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    assert kwargs["up_block_types"] == ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")


def test_bad_inputs_raise_clear_errors():
    cfg = UNetConfig.from_preset("tiny")
    model = UNet(cfg)
    with pytest.raises(ValueError, match=r"expects images \(B, 1, 16, 16\).*got \(2, 3, 16, 16\)"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"got \(2, 1, 28, 28\)"):
        model(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"t must be \(B,\)"):
        model(torch.randn(2, 1, 16, 16), torch.tensor([1]))
    with pytest.raises(ConfigError, match="attn_resolutions"):
        UNetConfig.from_preset("tiny", attn_resolutions=(5,))
    with pytest.raises(ConfigError, match="num_groups"):
        UNetConfig(ch=24)


def test_ema_update_arithmetic():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(1.0)
    ema.update(model)  # 0.9 * 1 + 0.1 * 3 = 1.2 ; 0.9 * 0 + 0.1 * 1 = 0.1
    ema.update(model)  # 0.9 * 1.2 + 0.1 * 3 = 1.38 ; 0.19
    assert_close(ema.shadow["weight"], torch.full((1, 2), 1.38))
    assert_close(ema.shadow["bias"], torch.full((1,), 0.19))
    with ema.applied_to(model):
        assert_close(model.weight.detach(), torch.full((1, 2), 1.38))
    assert_close(model.weight.detach(), torch.full((1, 2), 3.0))
