"""Presets: paper-size parameter counts (built on the meta device), the FFN rule, and validation errors."""

from __future__ import annotations

import pytest
import torch

from axon_shared.config import ConfigError
from x_llama import Llama, LlamaConfig, TrainConfig
from x_llama.config import ffn_hidden_dim

# Llama 2 paper / Meta's released checkpoints. 7B: 6,738,415,616 exactly.
PAPER_COUNTS = {"llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "llama2-70b": 68_976_648_192}


@pytest.mark.parametrize("preset", sorted(PAPER_COUNTS))
def test_paper_parameter_counts_on_meta_device(preset):
    config = LlamaConfig.from_preset(preset)
    with torch.device("meta"):
        model = Llama(config)
    assert model.num_parameters() == PAPER_COUNTS[preset]
    assert config.num_parameters() == PAPER_COUNTS[preset]  # the README's closed form


def test_hidden_sizes_match_the_released_models():
    assert LlamaConfig.from_preset("llama2-7b").hidden_dim == 11008
    assert LlamaConfig.from_preset("llama2-13b").hidden_dim == 13824
    assert LlamaConfig.from_preset("llama2-70b").hidden_dim == 28672
    assert LlamaConfig.from_preset("llama2-70b").kv_heads == 8
    assert ffn_hidden_dim(64, 32, None) == 192  # int(2*256/3) = 170 -> 192


def test_70b_kv_projection_shapes():
    with torch.device("meta"):
        model = Llama(LlamaConfig.from_preset("llama2-70b", n_layers=1))
    assert model.layers[0].attention.wk.weight.shape == (8 * 128, 8192)
    assert model.layers[0].attention.wq.weight.shape == (8192, 8192)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(dim=66, n_heads=4), "dim"),
        (dict(dim=12, n_heads=4), "dim"),  # odd head dim: RoPE needs pairs
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_kv_heads=0), "n_kv_heads"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"LlamaConfig\.{field}="):
        LlamaConfig.from_preset("tiny", **overrides)


def test_train_config_rejects_seq_len_beyond_model():
    with pytest.raises(ConfigError, match="max_seq_len"):
        TrainConfig.from_preset("tiny", data={"seq_len": 1000})


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="llama2-7b"):
        LlamaConfig.from_preset("llama3")
