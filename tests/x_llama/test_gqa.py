"""GQA uptraining (Ainslie et al. 2023, section 2.1): converting multi-head key/value projections into grouped ones,
checked against by-hand pooling, against the same conversion done in transformers' layout, and end to end through
`x-llama uptrain`."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch.testing import assert_close

from x_llama import Llama, LlamaConfig
from x_llama.cli import main
from x_llama.config import UptrainConfig
from x_llama.gqa import convert_kv_heads, uptrain_config
from x_llama.hf import from_hf, to_hf
from x_llama.train import load_pretrained

from .conftest import tiny_train_args
from .test_hf_parity import random_hf_llama


def mha_model(n_heads: int = 8, seed: int = 0) -> Llama:
    """A 2-layer MHA model with randomised norm gains (so a mixed-up tensor shows in the logits)."""
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(vocab_size=101, dim=64, n_layers=2, n_heads=n_heads, multiple_of=16, max_seq_len=32)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.uniform_(0.5, 1.5)
    return model


def tokens(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 101, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["GQA-4", "GQA-2", "MQA"])
@pytest.mark.parametrize("method", ["mean", "first"])
def test_identical_heads_in_each_group_give_the_same_logits(n_kv_heads, method):
    """If the key/value heads of every group are already equal, pooling loses nothing: the GQA model computes the
    same function (fails if groups are formed from the wrong heads, e.g. strided instead of consecutive)."""
    model = mha_model()
    group, d = 8 // n_kv_heads, model.config.head_dim
    with torch.no_grad():
        for layer in model.layers:
            for linear in (layer.attention.wk, layer.attention.wv):
                heads = linear.weight.view(8, d, -1)
                for h in range(8):
                    heads[h] = heads[(h // group) * group]  # every head copies its group's first head
    converted = convert_kv_heads(model, n_kv_heads, method)
    assert converted.config.n_kv_heads == n_kv_heads and converted.layers[0].attention.wk.out_features == n_kv_heads * d
    x = tokens()
    assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)


def test_mean_pooling_is_the_mean_of_each_groups_heads():
    """W_k^(g) = mean of the group's W_k^(i) (paper Figure 1), written with explicit loops over heads."""
    model = mha_model()
    converted = convert_kv_heads(model, 2, "mean")
    d = model.config.head_dim
    for old, new in zip(model.layers, converted.layers, strict=True):
        for name in ("wk", "wv"):
            weight = getattr(old.attention, name).weight
            expected = torch.cat([sum(weight[h * d : (h + 1) * d] for h in range(g * 4, g * 4 + 4)) / 4 for g in range(2)])
            assert_close(getattr(new.attention, name).weight, expected)
        assert torch.equal(new.attention.wq.weight, old.attention.wq.weight)
        assert torch.equal(new.attention.wo.weight, old.attention.wo.weight)
        assert torch.equal(new.feed_forward.w1.weight, old.feed_forward.w1.weight)
    first = convert_kv_heads(model, 2, "first")
    weight = model.layers[0].attention.wk.weight
    assert torch.equal(first.layers[0].attention.wk.weight, torch.cat([weight[0:d], weight[4 * d : 5 * d]]))
    random = convert_kv_heads(model, 2, "random", seed=3)
    drawn = random.layers[0].attention.wk.weight
    assert abs(float(drawn.detach().std()) - model.config.init_std) < 0.005  # a fresh N(0, init_std) draw, not a copy
    assert torch.equal(drawn, convert_kv_heads(model, 2, "random", seed=3).layers[0].attention.wk.weight)
    assert not torch.equal(drawn, convert_kv_heads(model, 2, "random", seed=4).layers[0].attention.wk.weight)


@pytest.mark.parametrize("n_kv_heads", [2, 1], ids=["GQA-2", "MQA"])
def test_conversion_matches_mean_pooling_done_in_transformers_layout(n_kv_heads):
    """Mean-pool an HF LlamaForCausalLM's k_proj / v_proj by hand (HF's rotate-half row order, HF's repeat_kv
    grouping), load it in transformers as a GQA model, and compare with our conversion of the same weights; then our
    converted model goes back to transformers with to_hf and gives the same logits."""
    hf_mha = random_hf_llama(8)  # 8 heads of 8 dims, randomised norm gains
    hf_config = hf_mha.config
    hf_state = hf_mha.state_dict()
    group, d = 8 // n_kv_heads, 64 // 8
    for name in list(hf_state):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            hf_state[name] = hf_state[name].view(n_kv_heads, group, d, 64).mean(dim=1).reshape(n_kv_heads * d, 64)
    hf_gqa = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**hf_config.to_dict(), "num_key_value_heads": n_kv_heads})).eval()
    hf_gqa.load_state_dict(hf_state)

    ours = convert_kv_heads(from_hf(hf_mha), n_kv_heads, "mean")
    x = tokens()
    with torch.no_grad():
        expected = hf_gqa(x).logits
        assert_close(ours(x), expected, rtol=1e-4, atol=1e-4)
        assert_close(to_hf(ours).eval()(x).logits, expected, rtol=1e-4, atol=1e-4)


def test_conversion_refuses_a_head_count_that_does_not_divide():
    with pytest.raises(ValueError, match="must divide"):
        convert_kv_heads(mha_model(), 3)
    with pytest.raises(ValueError, match="method"):
        convert_kv_heads(mha_model(), 2, "median")


def test_uptrain_config_rejects_bad_values():
    from axon_shared.config import ConfigError

    with pytest.raises(ConfigError, match="fraction"):
        UptrainConfig(fraction=0.0)
    with pytest.raises(ConfigError, match="method"):
        UptrainConfig(method="median")


def test_uptrain_writes_a_normal_run(tmp_path, tokenizer_path):
    """`x-llama uptrain` from a tiny MHA run: alpha * steps steps at the original run's final learning rate, a step-0
    evaluation of the converted model, a run that load_pretrained reads as GQA, and a second call that resumes
    (here: finds the run finished)."""
    source = tmp_path / "mha"
    args = tiny_train_args(tokenizer_path, source)
    main([*args[: args.index("--train.steps")], "--train.steps", "20", *args[args.index("--train.steps") + 2 :], "--model.n_kv_heads", "4"])
    out = tmp_path / "gqa"
    uptrain_args = ["uptrain", "--from_run", str(source), "--n_kv_heads", "1", "--method", "random", "--fraction", "0.25"]
    uptrain_args += ["--warmup_steps", "0", "--out_dir", str(out)]
    main(uptrain_args)

    cfg, _ = uptrain_config(UptrainConfig(from_run=str(source), n_kv_heads=1, fraction=0.25, out_dir=str(out)))
    assert cfg.train.steps == 5 and cfg.train.lr == pytest.approx(3e-3 * 0.1) and cfg.model.n_kv_heads == 1
    model, tokenizer, config = load_pretrained(out)
    assert config.n_kv_heads == 1 and tokenizer is not None and (out / "tokenizer.model").is_file()
    assert model.layers[0].attention.wk.out_features == config.head_dim
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    valid = [(r["step"], r["valid/loss"]) for r in records if "valid/loss" in r]
    assert valid[0][0] == 0 and valid[-1][0] == 5
    assert valid[-1][1] < valid[0][1]  # random new heads: uptraining must recover some of the loss they cost
    main(uptrain_args)  # the run is complete: resuming trains nothing and keeps the checkpoint
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())][-1] == 5
