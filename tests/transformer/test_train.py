"""Training pieces: loss, schedule, accumulation, batching, averaging, overfitting, exact resume, bad input."""

import json
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from axon_shared.checkpoint import average_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from axon_shared.training import Trainer
from transformer import Transformer, TransformerConfig, greedy_decode, label_smoothed_loss
from transformer.config import TrainConfig
from transformer.data import BucketedBatches, Example, collate, length_buckets
from transformer.train import NoamSchedule, target_tokens, token_loss, train

PAD = 3


def tiny(**overrides):
    values = dict(vocab_size=30, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=64, dropout=0.0, max_len=32)
    return TransformerConfig(**{**values, **overrides})


def test_label_smoothed_loss_equals_direct_computation():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=gen)
    target = torch.randint(4, 11, (2, 5), generator=gen)
    target[1, 3:] = PAD
    eps = 0.1
    smoothed, nll, n = label_smoothed_loss(logits, target, epsilon=eps, pad_id=PAD)
    # direct: sum over real tokens of KL(q || p) + H(q), q = (1 - eps) onehot + eps / V
    logp = logits.log_softmax(-1)
    expected_smoothed = expected_nll = 0.0
    for b in range(2):
        for t in range(5):
            if target[b, t] == PAD:
                continue
            q = torch.full((11,), eps / 11)
            q[target[b, t]] += 1 - eps
            expected_smoothed += -(q * logp[b, t]).sum()
            expected_nll += -logp[b, t, target[b, t]]
            kl = (q * (q.log() - logp[b, t])).sum()
            entropy = -(q * q.log()).sum()
            assert_close(kl + entropy, -(q * logp[b, t]).sum())
    assert n == 8
    assert_close(smoothed, torch.as_tensor(expected_smoothed))
    assert_close(nll, torch.as_tensor(expected_nll))
    # and torch's own label-smoothed cross-entropy agrees
    reference = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=PAD, label_smoothing=eps, reduction="sum")
    assert_close(smoothed, reference)


def test_noam_schedule_values():
    schedule = NoamSchedule(d_model=512, warmup=4000)
    assert schedule(1) == pytest.approx(512**-0.5 * 4000**-1.5)
    assert schedule(4000) == pytest.approx(512**-0.5 * 4000**-0.5)  # the peak, ~7.0e-4
    assert schedule(4000) == pytest.approx(6.9877e-4, rel=1e-4)
    assert schedule(16000) == pytest.approx(schedule(4000) / 2)  # inverse square root decay
    assert schedule(2000) == pytest.approx(schedule(4000) / 2)  # linear warm-up


def test_noam_cooldown_ramps_eq3_linearly_to_zero_over_the_last_steps():
    plain = NoamSchedule(d_model=256, warmup=300, factor=0.3)
    cooled = NoamSchedule(d_model=256, warmup=300, factor=0.3, total=3400, cooldown=800)
    for step in (1, 300, 1000, 2600):  # before the cooldown: eq. 3 unchanged
        assert cooled(step) == plain(step)
    for step in (2601, 2800, 3000, 3399, 3400):  # then eq. 3 times the fraction of the cooldown still to go
        assert cooled(step) == pytest.approx(plain(step) * (3400 - step + 1) / 800)
    assert cooled(3400) == pytest.approx(plain(3400) / 800)  # the last update still moves the weights
    assert cooled(3401) == 0.0
    with pytest.raises(ValueError, match="cooldown"):
        NoamSchedule(d_model=256, total=100, cooldown=101)


def test_training_loop_follows_the_cooldown_schedule(tmp_path):
    """`train.cooldown_steps` reaches the optimizer: the lr logged at each step is the schedule's, ending at 1/N of eq. 3."""
    config = run_config(tmp_path, 5).replace(train=dict(cooldown_steps=3, eval_every=5, checkpoint_every=5))
    train(config)
    logged = {row["step"]: row["lr"] for row in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "lr" in row}
    plain = NoamSchedule(d_model=config.model.d_model, warmup=10)
    assert sorted(logged) == [1, 2, 3, 4, 5]
    assert [logged[s] for s in range(1, 6)] == pytest.approx([plain(1), plain(2), plain(3), plain(4) * 2 / 3, plain(5) / 3])


def test_gradient_accumulation_weighs_every_target_token_the_same(tmp_path):
    """Through the training loop with token_loss + target_tokens: micro-batches of 9 and 17 target tokens give the
    gradient of the label-smoothed loss summed over the whole step / 26 tokens. (With Adam betas 0 and eps = lr =
    1e6, one AdamW step moves the parameters by minus the gradient.)"""
    cfg = tiny()
    gen = torch.Generator().manual_seed(1)
    examples = [
        Example(torch.randint(4, 30, (n,), generator=gen).tolist() + [2], torch.randint(4, 30, (m,), generator=gen).tolist())
        for n, m in [(3, 9), (5, 2), (7, 4), (2, 3), (4, 8)]
    ]
    micro = [collate(examples[:1], cfg), collate(examples[1:], cfg)]
    assert [target_tokens(b, PAD) for b in micro] == [9 + 1, 17 + 4]  # targets + eos
    run = TrainConfig(model=cfg).replace(
        train=dict(out_dir=str(tmp_path), steps=1, grad_accum=2, lr=1e6, eps=1e6, beta1=0.0, beta2=0.0, warmup_steps=1, progress=False)
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    before = [p.detach().clone() for p in model.parameters()]
    with Trainer(run.train, run, name="test") as trainer:
        trainer.fit(
            model,
            loss=lambda m, b: token_loss(m, b, cfg),
            batch=lambda step, i: micro[i],
            weight=lambda b: target_tokens(b, PAD),
            schedule=lambda step: 1e6,
        )
    torch.manual_seed(0)
    reference = Transformer(cfg)
    together = collate(examples, cfg)
    smoothed, _, n = label_smoothed_loss(reference(together[0], together[1]), together[2], epsilon=cfg.label_smoothing, pad_id=PAD)
    (smoothed / n).backward()
    for p, b, r in zip(model.parameters(), before, reference.parameters()):
        assert_close(p.detach() - b, -r.grad, rtol=1e-4, atol=1e-6)


def test_bucketed_batches_are_a_pure_function_of_the_index():
    """Micro-batch m of the endless epochs: the same whatever was asked before (resume needs no data position),
    every example once per epoch, and each rank of 2 takes every other batch."""
    examples = [Example([5] * (1 + i % 13) + [2], [6] * (1 + i % 7)) for i in range(200)]
    batches = BucketedBatches(examples, max_tokens=60, seed=3)
    sequence = [batches(m) for m in range(3 * batches.per_epoch)]
    fresh = BucketedBatches(examples, max_tokens=60, seed=3)
    assert fresh(2 * batches.per_epoch + 5) == sequence[2 * batches.per_epoch + 5]
    first_epoch = [id(e) for b in sequence[: batches.per_epoch] for e in b]
    assert sorted(first_epoch) == sorted(id(e) for e in examples)
    assert sequence[: batches.per_epoch] != sequence[batches.per_epoch : 2 * batches.per_epoch]  # reshuffled
    ranks = [BucketedBatches(examples, max_tokens=60, seed=3, rank=r, world_size=2) for r in range(2)]
    everything = length_buckets([e.size for e in examples], 60, 3 * 100_003)
    assert ranks[0].per_epoch == len(everything) // 2
    assert [len(b) for b in (ranks[0](0), ranks[1](0))] == [len(everything[0]), len(everything[1])]


def test_length_buckets_respect_max_tokens_and_cover_everything():
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(2, 60, (500,), generator=gen).tolist()
    batches = length_buckets(sizes, max_tokens=200, seed=3)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(500))
    assert all(len(b) * max(sizes[i] for i in b) <= 200 or len(b) == 1 for b in batches)
    assert batches == length_buckets(sizes, max_tokens=200, seed=3)  # deterministic
    assert batches != length_buckets(sizes, max_tokens=200, seed=4)  # reshuffled per epoch seed
    spread = [max(sizes[i] for i in b) - min(sizes[i] for i in b) for b in batches]
    assert sum(spread) / len(spread) < 5  # grouped by length


def test_collate_puts_eos_before_padding():
    cfg = tiny()
    src, tgt_in, tgt_out = collate([Example([5, 6, 2], [7, 8, 9]), Example([5, 2], [7])], cfg)
    assert src.tolist() == [[5, 6, 2], [5, 2, PAD]]
    assert tgt_in.tolist() == [[1, 7, 8, 9], [1, 7, PAD, PAD]]
    assert tgt_out.tolist() == [[7, 8, 9, 2], [7, 2, PAD, PAD]]


def test_checkpoint_averaging_is_the_parameter_mean(tmp_path):
    paths, models = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(Transformer(tiny()))
        paths.append(save_checkpoint(tmp_path / f"step_{seed:08d}.safetensors", model=models[-1], step=seed))
    averaged = average_checkpoints(paths)
    for name, tensor in averaged.items():
        expected = sum(m.state_dict()[name] for m in models) / 3
        assert_close(tensor, expected)
    model = Transformer(tiny())
    model.load_state_dict(averaged)
    assert model.output_weight is model.embedding.weight


@pytest.mark.parametrize("task", ["copy", "reverse"])
def test_overfits_a_small_batch(task):
    torch.manual_seed(0)
    cfg = tiny(label_smoothing=0.0)
    model = Transformer(cfg)
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(4, 30, (n,), generator=gen).tolist() for n in (3, 5, 6, 4, 6, 2, 5, 4)]
    targets = rows if task == "copy" else [r[::-1] for r in rows]
    src, tgt_in, tgt_out = collate([Example(r + [2], t) for r, t in zip(rows, targets)], cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-9)
    for _ in range(150):
        loss, _, n = label_smoothed_loss(model(src, tgt_in), tgt_out, epsilon=0.0, pad_id=PAD)
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
    assert (loss / n).item() < 0.02
    model.eval()
    assert greedy_decode(model, src, max_len=12) == targets


def run_config(out_dir, steps):
    return TrainConfig.from_preset(
        "tiny",
        model=dict(vocab_size=300, max_len=48),
        data=dict(train_limit=300, valid_limit=30, spm_sample=600),
        train=dict(
            out_dir=str(out_dir),
            batch_size=400,
            steps=steps,
            checkpoint_every=3,
            eval_every=3,
            eval_bleu_sentences=5,
            log_every=1,
            warmup_steps=10,
            progress=False,
        ),
    )


def test_exact_resume(tmp_path):
    train(run_config(tmp_path / "straight", 6))
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed", ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl"))
    train(run_config(tmp_path / "resumed", 3))  # stops at step 3 ...
    train(run_config(tmp_path / "resumed", 6))  # ... and resumes from its checkpoint
    a = load_checkpoint(latest_checkpoint(tmp_path / "straight" / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "resumed" / "checkpoints"))
    assert a.step == b.step == 6
    for name, tensor in a.tensors["model"].items():
        assert torch.equal(tensor, b.tensors["model"][name]), name
    first = load_checkpoint(tmp_path / "straight" / "checkpoints" / "step_00000003.safetensors")
    assert any(not torch.equal(t, a.tensors["model"][k]) for k, t in first.tensors["model"].items())  # training moved
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # the resumed log reads like an uninterrupted one


def test_translator_bad_input(tmp_path):
    from axon_shared.tokenizer import train_sentencepiece
    from transformer.inference import Translator

    texts = ["the cat sits on the mat", "der Hund liegt auf dem Teppich", "a table of contents", "ein Inhaltsverzeichnis"] * 20
    tokenizer = train_sentencepiece(texts, tmp_path / "spm.model", vocab_size=40, pad_id=3)
    cfg = tiny(vocab_size=tokenizer.vocab_size, max_len=12)
    translator = Translator(Transformer(cfg).eval(), tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = translator.translate(["", "   ", "\u4e2d\u6587\u5b57", "the cat " * 20, "the mat"], beam_size=2)
    assert out[0] == "" and out[1] == ""  # empty input: empty output, the model is not run
    assert all(isinstance(o, str) for o in out)  # unknown characters (unk) and over-long input still translate
    assert any("truncated" in str(w.message) for w in caught)
    assert translator.translate([], beam_size=4) == []


def test_ema_of_the_weights_follows_every_step_and_is_checkpointed(tmp_path):
    """`train.ema_decay`: after optimizer step k the shadow is d_k * shadow + (1 - d_k) * weights, with the warm-up
    rule d_k = min(decay, k / (9 + k)); it is saved in every checkpoint, validated beside the trained weights, and
    `load_model(use_ema=True)` / `average_checkpoints(part="ema")` read it."""
    from transformer.inference import load_model

    config = run_config(tmp_path, 4).replace(train=dict(ema_decay=0.99, checkpoint_every=1, eval_every=4))
    train(config)
    ckpts = {k: load_checkpoint(tmp_path / "checkpoints" / f"step_{k:08d}.safetensors") for k in (3, 4)}
    decay = min(0.99, 4 / (9 + 4))
    for name, weights in ckpts[4].tensors["model"].items():
        expected = decay * ckpts[3].tensors["ema"][name] + (1 - decay) * weights.float()
        assert_close(ckpts[4].tensors["ema"][name], expected)
    moved = [name for name, t in ckpts[4].tensors["model"].items() if not torch.equal(t, ckpts[4].tensors["ema"][name])]
    assert moved, "the EMA equals the trained weights: it was not averaged"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in rows if r["step"] == 4 and "valid/nll" in r)
    assert {"valid/nll_ema", "valid/bleu_ema"} <= set(final) and final["valid/nll_ema"] != final["valid/nll"]
    model, _, _ = load_model(tmp_path, use_ema=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpts[4].tensors["ema"][name]), name
    averaged = average_checkpoints([ckpts[3].path, ckpts[4].path], part="ema")
    assert_close(averaged[moved[0]], (ckpts[3].tensors["ema"][moved[0]] + ckpts[4].tensors["ema"][moved[0]]) / 2)


def test_a_run_without_ema_refuses_ema_weights_and_an_ema_on_resume(tmp_path):
    from axon_shared.checkpoint import CheckpointError
    from axon_shared.config import ConfigError
    from transformer.inference import load_model

    train(run_config(tmp_path, 3))
    with pytest.raises(CheckpointError, match="no EMA weights.*--use_ema false"):
        load_model(tmp_path, use_ema=True)
    with pytest.raises(ConfigError, match="holds no EMA weights"):
        train(run_config(tmp_path, 6).replace(train=dict(ema_decay=0.99)))
