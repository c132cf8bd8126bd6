"""Training pieces: loss, schedule, accumulation, batching, averaging, overfitting, exact resume, bad input."""

import json
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from axon_shared.checkpoint import average_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from axon_shared.distributed import DistContext
from axon_shared.schedules import NoamSchedule
from torch.testing import assert_close

from transformer import Transformer, TransformerConfig, greedy_decode, label_smoothed_loss
from transformer.config import TrainConfig
from transformer.data import Example, collate, length_buckets
from transformer.train import accumulate_gradients, train

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


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    cfg = tiny()
    model = Transformer(cfg)
    gen = torch.Generator().manual_seed(1)
    examples = [Example(torch.randint(4, 30, (n,), generator=gen).tolist() + [2], torch.randint(4, 30, (m,), generator=gen).tolist())
                for n, m in [(3, 9), (5, 2), (7, 4), (2, 3), (4, 8)]]
    ctx = DistContext()

    def grads(micro):
        model.zero_grad()
        accumulate_gradients(model, micro, cfg, ctx)
        return [p.grad.clone() for p in model.parameters()]

    together = grads([collate(examples, cfg)])
    split = grads([collate(examples[:1], cfg), collate(examples[1:], cfg)])  # 9 vs 17 target tokens
    for a, b in zip(together, split):
        assert_close(a, b, rtol=1e-5, atol=1e-6)
    # dividing each micro-batch by its own token count would be wrong, and detectably so
    model.zero_grad()
    for micro in [collate(examples[:1], cfg), collate(examples[1:], cfg)]:
        smoothed, _, n = label_smoothed_loss(model(micro[0], micro[1]), micro[2], epsilon=cfg.label_smoothing, pad_id=PAD)
        (smoothed / n / 2).backward()
    assert max((p.grad - g).abs().max() for p, g in zip(model.parameters(), together)) > 1e-4


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


def run_config(out_dir, max_steps):
    return TrainConfig.from_preset(
        "tiny",
        model=dict(vocab_size=300, max_len=48),
        data=dict(train_limit=300, valid_limit=30, max_tokens=400, spm_sample=600),
        train=dict(out_dir=str(out_dir), max_steps=max_steps, save_every=3, eval_every=3, eval_bleu_sentences=5, log_every=1, warmup=10),
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
    assert a.extra["epoch"] == b.extra["epoch"] and a.extra["position"] == b.extra["position"]
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


def test_ddp_two_ranks_equal_one_process_with_accumulation(tmp_path):
    """2 ranks x 2 micro-batches each (unequal token counts) give the gradient of the whole 4-micro-batch step."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("_transformer_ddp_worker.py")
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sys.path.insert(0, str(worker.parent))
    try:
        from _transformer_ddp_worker import make_problem
    finally:
        sys.path.pop(0)
    cfg, model, micro = make_problem()
    accumulate_gradients(model, micro, cfg, DistContext())
    ddp_grads = load_checkpoint(out).tensors["grad"]
    for name, p in model.named_parameters():
        assert_close(ddp_grads[name], p.grad, rtol=1e-5, atol=1e-6)
