"""Every architecture variant (x_llama.ablate.VARIANTS) as a whole model: it builds from its config, trains (finite
loss, its auxiliary losses in the training loss), decodes with the KV cache exactly as the uncached forward,
counts its parameters, saves and resumes bit-for-bit through the one loop, and is refused by Llama-2-only formats."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from axon_shared.config import ConfigError
from x_llama.ablate import VARIANTS, variant_train_config
from x_llama.config import AblateConfig, LlamaConfig, TrainConfig
from x_llama.generation import generate
from x_llama.model import Llama, lm_loss

NAMES = list(VARIANTS)


def tiny_config(name: str) -> LlamaConfig:
    """The ablation's model overrides on the `tiny` preset (max_seq_len 4 x seq_len, as the ablation builds it)."""
    return variant_train_config(AblateConfig(base="tiny", steps=4, variants=name), name, 1, 4).model


@pytest.mark.parametrize("name", NAMES)
def test_variant_trains_a_step(name):
    torch.manual_seed(0)
    model = Llama(tiny_config(name)).train()
    tokens = torch.randint(0, 512, (2, 33))
    loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    auxiliary = model.auxiliary_loss()
    routed = model.config.ffn == "moe" or model.config.router == "mod"
    assert (auxiliary is not None) == routed, "MoE and MoD add their router losses; the others have none"
    total = loss + (auxiliary if auxiliary is not None else 0.0)
    total.backward()
    assert torch.isfinite(total)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    model(tokens)
    assert model.auxiliary_loss() is None, "no auxiliary loss in eval mode"


@pytest.mark.parametrize("name", NAMES)
def test_cached_decoding_equals_the_uncached_forward(name):
    """Prefill, then one token at a time with the KV cache, against the full forward in eval mode; and greedy
    generation with and without the cache gives the same tokens (batch of 2 prompts of different lengths)."""
    torch.manual_seed(0)
    model = Llama(tiny_config(name)).eval()
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, 32)
        steps = [model(tokens[:, :11], cache=cache)] + [model(tokens[:, t : t + 1], cache=cache) for t in range(11, 20)]
    assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    prompts = [tokens[0, :7].tolist(), tokens[1, :12].tolist()]
    assert generate(model, prompts, 10, use_cache=True) == generate(model, prompts, 10, use_cache=False)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts(name):
    model = Llama(tiny_config(name))
    total, active = model.num_parameters(), model.active_parameters()
    assert total == sum(p.numel() for p in model.parameters())
    if model.config.ffn in ("moe", "peer"):
        assert active < total, "a sparse feed-forward uses only its routed experts per token"
    else:
        assert active == total


@pytest.mark.parametrize("name", [n for n in NAMES if n != "baseline"])
def test_llama2_only_formats_refuse_variants(name):
    from x_llama.hf import to_hf

    model = Llama(tiny_config(name))
    with pytest.raises(ConfigError, match="plain Llama 2"):
        to_hf(model)
    with pytest.raises(ValueError, match="Llama 2 only"):
        model.config.num_parameters()


def test_config_names_the_bad_field():
    with pytest.raises(ConfigError, match="position"):
        LlamaConfig.from_preset("tiny", position="sinusoidal")
    with pytest.raises(ConfigError, match="top_k"):
        LlamaConfig.from_preset("tiny", ffn="moe", moe={"n_experts": 2, "top_k": 3})
    with pytest.raises(ConfigError, match="n_experts"):
        LlamaConfig.from_preset("tiny", ffn="peer", peer={"n_experts": 1000})
    with pytest.raises(ConfigError, match="attention"):
        LlamaConfig.from_preset("tiny", attention="differential", n_heads=4, n_kv_heads=1)
    with pytest.raises(ConfigError, match="variants"):
        AblateConfig(variants="baseline,rnn")


def test_praxis_trains_saves_and_resumes_bit_for_bit(tmp_path):
    """The combination (ALiBi, differential attention, MoD, MoE, hyper-connections) through the one loop: 4 steps
    straight equal 2 steps, a restart, and 2 more (parameters and the logged losses)."""
    from x_llama.train import load_pretrained, train

    def config(out_dir, steps):
        base = TrainConfig.from_preset("tiny")
        model = dict(tiny_config("praxis").to_dict(), vocab_size=base.model.vocab_size)
        return base.replace(
            model=model,
            data={"max_train_chars": 300_000, "max_valid_chars": 30_000, "tokenizer_chars": 300_000},
            train={"out_dir": str(out_dir), "steps": steps, "checkpoint_every": 2, "eval_every": 2, "eval_batches": 1, "batch_size": 4},
        )

    straight = train(config(tmp_path / "straight", 4))
    train(config(tmp_path / "resumed", 2))
    resumed = train(config(tmp_path / "resumed", 4))
    a, _, _ = load_pretrained(straight)
    b, _, _ = load_pretrained(resumed)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert a.config.variant_summary() == "alibi+differential+moe+mod+hyper"


def test_hyper_connection_stream_mixing_is_not_weight_decayed():
    """A_r starts as the identity (the residual path); AdamW's decay must not pull it to 0. Other matrices decay."""
    from axon_shared.training import decay_groups

    model = Llama(tiny_config("hyper"))
    decayed, kept = (set(map(id, group["params"])) for group in decay_groups(model, 0.1))
    mixing = model.layers[0].hyper_connections[0].residual_weights
    assert id(mixing) in kept and id(model.layers[0].attention.wq.weight) in decayed


def test_moe_under_fullgraph_compile_is_a_clear_error(tmp_path):
    """MoE's per-expert loop stays eager (its group sizes change every step): `--train.compile true` must stop with
    a ConfigError that names compile and the way out, not a dynamo traceback."""
    from x_llama.train import train

    base = TrainConfig.from_preset("tiny")
    cfg = base.replace(
        model={"ffn": "moe", "moe": {"n_experts": 4}},
        data={"max_train_chars": 200_000, "max_valid_chars": 20_000, "tokenizer_chars": 200_000},
        train={"out_dir": str(tmp_path / "moe"), "steps": 1, "compile": True, "batch_size": 2},
    )
    with pytest.raises(ConfigError, match="compile=True.*set compile false"):
        train(cfg)
