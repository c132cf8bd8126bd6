"""Parity with transformers.LlamaForCausalLM (fp32, eager attention) for MHA, GQA and MQA; to_hf and
Meta-layout round trips."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.testing import assert_close

from x_llama import Llama, LlamaConfig, generate, lm_loss
from x_llama.hf import from_hf, load_meta_checkpoint, save_meta_checkpoint, state_dict_to_hf, to_hf
from x_llama.rope import permute_for_half


def random_hf_llama(n_kv_heads: int, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises norms to 1; randomise them too so a swapped norm would show
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("n_kv_heads", [8, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_from_hf_logits_match(n_kv_heads):
    hf_model = random_hf_llama(n_kv_heads)
    model = from_hf(hf_model).eval()
    assert model.config.kv_heads == n_kv_heads
    tokens = torch.randint(0, 101, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        actual = model(tokens)
    assert_close(actual, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("n_kv_heads", [8, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_training_loss_and_every_gradient_match(n_kv_heads):
    """Training, not only inference: the loss and the gradient of every parameter against transformers' autograd
    (ours mapped to HF's names and RoPE layout by the same function that maps the weights), so a backward that
    diverged from the forward's maths (a custom autograd function, a detached tensor) would show."""
    hf_model = random_hf_llama(n_kv_heads, seed=3).train()
    model = from_hf(hf_model).train()
    tokens = torch.randint(0, 101, (3, 41), generator=torch.Generator().manual_seed(4))
    ours = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    theirs = lm_loss(hf_model(tokens[:, :-1]).logits, tokens[:, 1:])
    ours.backward()
    theirs.backward()
    assert_close(ours, theirs, atol=1e-5, rtol=0)
    grads = state_dict_to_hf({name: p.grad for name, p in model.named_parameters()}, model.config)
    theirs_grads = dict(hf_model.named_parameters())
    assert grads.keys() == theirs_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, theirs_grads[name].grad, atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("n_kv_heads", [8, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_from_hf_left_padded_batch_matches(n_kv_heads):
    """Same padded batch and mask through both models; HF gets explicit position ids."""
    hf_model = random_hf_llama(n_kv_heads, seed=5)
    model = from_hf(hf_model).eval()
    tokens = torch.randint(3, 101, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens)
    mask[0, :5] = 0
    tokens[0, :5] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf_model(tokens, attention_mask=mask, position_ids=positions).logits
        actual = model(tokens, attention_mask=mask)
    assert_close(actual[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=0)


def test_wrong_kv_permutation_would_be_caught():
    """Permuting W_k with n_heads instead of n_kv_heads (a classic GQA bug) changes the logits."""
    hf_model = random_hf_llama(2)
    model = from_hf(hf_model).eval()
    state = hf_model.state_dict()
    key = "model.layers.0.self_attn.k_proj.weight"
    broken = permute_for_half(model.layers[0].attention.wk.weight.detach(), 8)  # wrong: 8 = n_heads
    assert not torch.equal(broken, state[key])
    assert torch.equal(permute_for_half(model.layers[0].attention.wk.weight.detach(), 2), state[key])


def test_to_hf_round_trip(tiny_model):
    hf_model = to_hf(tiny_model)
    tokens = torch.randint(0, tiny_model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(hf_model(tokens).logits, tiny_model(tokens), atol=1e-4, rtol=0)
    back = from_hf(hf_model)
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_greedy_generation_matches_hf(tiny_model):
    hf_model = to_hf(tiny_model)
    prompt = [1, 5, 9, 14]
    ours = generate(tiny_model, [prompt], 12)[0]
    theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == theirs[0, len(prompt) :].tolist()


def test_meta_layout_round_trip(tmp_path):
    """HF model -> our (Meta-layout) weights -> params.json + consolidated.00.pth -> load -> same logits as HF."""
    hf_model = random_hf_llama(2, seed=7)
    save_meta_checkpoint(from_hf(hf_model), tmp_path)
    loaded = load_meta_checkpoint(tmp_path, max_seq_len=64).eval()
    tokens = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_close(loaded(tokens), hf_model(tokens).logits, atol=1e-4, rtol=0)
    # Meta's files hold W_q / W_k in the interleaved layout: converting them with the recipe gives HF's weights
    meta_state = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    wq = meta_state["layers.1.attention.wq.weight"]
    recipe = wq.view(8, 4, 2, 64).transpose(1, 2).reshape(64, 64)
    assert torch.equal(recipe, hf_model.state_dict()["model.layers.1.self_attn.q_proj.weight"])


def test_meta_sharded_checkpoint_is_concatenated(tmp_path):
    """Two model-parallel shards (split like fairscale's layers) load to the same model as one file."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=96, max_seq_len=32)).eval()
    save_meta_checkpoint(model, tmp_path)
    state = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    axis = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}
    shards = [{}, {}]
    for name, tensor in state.items():
        key = name.split(".")[-2] if name.startswith("layers.") else name.split(".")[0]
        if key in axis:
            first, second = tensor.chunk(2, dim=axis[key])
            shards[0][name], shards[1][name] = first.clone(), second.clone()
        else:
            shards[0][name], shards[1][name] = tensor, tensor
    for index, shard in enumerate(shards):
        torch.save(shard, tmp_path / f"consolidated.{index:02d}.pth")
    loaded = load_meta_checkpoint(tmp_path, max_seq_len=32)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
