"""Training: overfitting one batch, exact resume, the optimizer groups, load_pretrained and the CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch.testing import assert_close

from axon_shared.checkpoint import latest_checkpoint, load_checkpoint
from axon_shared.training import decay_groups
from x_llama import Llama, LlamaConfig, TrainConfig, generate, lm_loss, load_pretrained
from x_llama.cli import main
from x_llama.train import train

from .conftest import tiny_train_args


def small_train_config(out_dir, tokenizer_path, **train_overrides) -> TrainConfig:
    return TrainConfig.from_preset(
        "tiny",
        model={"n_layers": 1, "max_seq_len": 32},
        data={"seq_len": 16, "tokenizer": str(tokenizer_path), "max_train_chars": 200_000, "max_valid_chars": 20_000},
        train={
            "out_dir": str(out_dir),
            "batch_size": 4,
            "warmup_steps": 2,
            "eval_every": 3,
            "eval_batches": 2,
            "checkpoint_every": 3,
            "log_every": 1,
            "progress": False,
            "keep_last": 5,
            **train_overrides,
        },
    )


def test_overfits_a_single_batch():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=64, max_seq_len=32))
    batch = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.05, float(loss.detach())
    # it now reproduces the batch greedily from its first token
    assert generate(model, [batch[0, :1].tolist()], 16)[0] == batch[0, 1:].tolist()


def test_weight_decay_only_on_matrices(tiny_model):
    decay, no_decay = decay_groups(tiny_model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(no_decay["params"]) == 2 * tiny_model.config.n_layers + 1  # the RMSNorm gains


def test_resume_after_a_crash_is_bit_exact(tmp_path, tokenizer_path, monkeypatch):
    """Run A: 6 steps. Run B crashes during step 5 (after the step-3 checkpoint); the same command resumes it to 6.
    Parameters, optimizer state and the metrics log are identical."""
    import x_llama.train as x_llama_train

    uninterrupted = train(small_train_config(tmp_path / "a", tokenizer_path, steps=6))
    real_batch_at = x_llama_train.batch_at
    config = small_train_config(tmp_path / "b", tokenizer_path, steps=6)
    step_5 = x_llama_train.step_seed(config.train.seed, 0, 5, 0)  # the windows of step 5 (counted from 1), micro-batch 0

    def crash_at_step_5(stream, batch_size, seq_len, seed):
        if seed == step_5:
            raise RuntimeError("simulated crash")
        return real_batch_at(stream, batch_size, seq_len, seed)

    monkeypatch.setattr(x_llama_train, "batch_at", crash_at_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config)
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step_00000003.safetensors"
    monkeypatch.setattr(x_llama_train, "batch_at", real_batch_at)
    resumed = train(config)
    a = load_checkpoint(latest_checkpoint(uninterrupted / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(resumed / "checkpoints"))
    assert a.step == b.step == 6
    for group in ("model", "optimizer"):
        assert a.tensors[group].keys() == b.tensors[group].keys()
        for name, tensor in a.tensors[group].items():
            assert torch.equal(tensor, b.tensors[group][name]), f"{group}/{name}"
    # the metrics log of the resumed run reads like the uninterrupted one
    steps_a = [json.loads(l)["step"] for l in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    steps_b = [json.loads(l)["step"] for l in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps_a == steps_b


def test_resuming_with_another_model_config_is_refused_before_anything_is_written(tmp_path, tokenizer_path):
    from axon_shared.errors import ConfigMismatchError

    config = small_train_config(tmp_path / "run", tokenizer_path, steps=1)
    train(config)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(ConfigMismatchError, match=r"model\.dim: 64 in the checkpoints, 32 now"):
        train(config.replace(model={"dim": 32, "n_heads": 2, "n_kv_heads": 1}, train={"steps": 2}))
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before  # config.json included


def test_loss_falls_and_load_pretrained_round_trips(tmp_path, tokenizer_path):
    run = train(small_train_config(tmp_path / "run", tokenizer_path, steps=40, lr=1e-2, eval_every=40, checkpoint_every=40))
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < losses[0] - 0.5
    for name in ("config.json", "loss.png", "samples.md"):
        assert (run / name).is_file(), name
    model, tokenizer, config = load_pretrained(run)
    assert config.n_layers == 1 and tokenizer.vocab_size == 512 and not model.training
    checkpoint = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, checkpoint.tensors["model"][name])
    ids = tokenizer.encode("And God said", bos=True)
    assert len(generate(model, [ids], 5)[0]) == 5


def test_activation_checkpointing_gives_the_same_gradients(tiny_config):
    torch.manual_seed(0)
    model = Llama(tiny_config).train()
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 12))
    lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    for before, parameter in zip(plain, model.parameters()):
        assert_close(parameter.grad, before, atol=1e-6, rtol=0)


def test_cli_train_generate_evaluate(tmp_path, tokenizer_path, capsys):
    out = tmp_path / "cli"
    main(tiny_train_args(tokenizer_path, out))
    assert latest_checkpoint(out / "checkpoints") is not None
    main(["generate", "--checkpoint", str(out), "--prompt", "In the beginning", "--max_new_tokens", "5"])
    shown = capsys.readouterr().out
    assert shown.startswith("In the beginning") and len(shown.strip()) > len("In the beginning")  # and something after it
    main(["evaluate", "--checkpoint", str(out), "--split", "valid", "--batches", "2", "--batch_size", "2"])
    assert "perplexity" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"TrainSection\.steps=0: must be > 0"):
        main(["train", "--preset", "tiny", "--train.steps", "0"])
    with pytest.raises(SystemExit, match=r"DataConfig\.max_train_chars=-5: must be > 0"):
        main(["train", "--preset", "tiny", "--data.max_train_chars", "-5"])
    with pytest.raises(SystemExit, match=r"TrainSection\.max_minutes=0\.0: must be > 0 minutes, or null"):
        main(["train", "--preset", "tiny", "--train.max_minutes", "0"])
    with pytest.raises(
        SystemExit, match=r"GenerateConfig\.max_new_tokens=500: the prompt has \d+ tokens and the model's context is 128"
    ) as error:
        main(["generate", "--checkpoint", str(out), "--prompt", "In the beginning", "--max_new_tokens", "500"])
    used, room = map(int, re.search(r"has (\d+) tokens .* to (\d+) or less", str(error.value)).groups())
    assert used + room == 128  # the room left is the context minus the prompt, and the prompt is not too long
    # a prompt that fills the context leaves room 0 and says to shorten it; one token less leaves room 1, no such hint
    _, tokenizer, _ = load_pretrained(str(out))
    words = next(n for n in range(1, 400) if len(tokenizer.encode(("the " * n).strip(), bos=True)) >= 127)
    for extra, room, hint in ((0, 1, False), (1, 0, True)):
        prompt = ("the " * (words + extra)).strip()
        assert len(tokenizer.encode(prompt, bos=True)) == 128 - room
        with pytest.raises(SystemExit, match=rf"has {128 - room} tokens .* to {room} or less") as error:
            main(["generate", "--checkpoint", str(out), "--prompt", prompt, "--max_new_tokens", "5"])
        assert ("shorten the prompt" in str(error.value)) == hint
    # room 1 and one new token: exactly the context, allowed
    main(["generate", "--checkpoint", str(out), "--prompt", ("the " * words).strip(), "--max_new_tokens", "1"])
    assert capsys.readouterr().out.startswith("the the")
    with pytest.raises(SystemExit, match=r"x-llama generate: error: .*nowhere does not exist; pass a run directory"):
        main(["generate", "--checkpoint", str(out / "nowhere"), "--prompt", "Hi"])


def test_demo_writes_a_report_fragment(tmp_path, tokenizer_path, monkeypatch):
    """`x-llama demo` (with a 4-step run standing in for the 3-minute one) writes REPORT.md for `make demo`."""
    import x_llama.train as x_llama_train

    monkeypatch.setattr(
        x_llama_train, "train", lambda cfg: train(small_train_config(cfg.train.out_dir, tokenizer_path, steps=4, eval_every=2))
    )
    out = tmp_path / "demo" / "x_llama"
    main(["demo", "--out_dir", str(out)])
    report = (out / "REPORT.md").read_text()
    assert report.startswith("## Llama 2: Open Foundation and Fine-Tuned Chat Models (x_llama)")
    assert "![loss](x_llama/loss.png)" in report and (out / "loss.png").is_file()
    assert "| 4 |" in report and "**In the beginning**" in report
