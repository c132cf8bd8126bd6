"""The one training loop (axon_shared.training) on a toy regression run: gradient accumulation, exact resume after
Ctrl-C, the run lock, resume checks, damaged leftovers of crashes, the time budget, evaluation's randomness, the
progress bar; then the same loop under torchrun (2 CPU processes): DDP accumulation, every rank's RNG restored, and a
stop decision every rank agrees on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from axon_shared.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from axon_shared.errors import AxonError, ConfigMismatchError, Interrupted, RunLockedError
from axon_shared.metrics import read_metrics
from axon_shared.progress import RunProgress
from axon_shared.training import Trainer, batch_indices

from .toy_run import DATA, ToyModel, fit_toy, toy_config, toy_model

WORKER = Path(__file__).with_name("_training_worker.py")


def checkpoint_tensors(run: Path) -> dict:
    ckpt = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    return {f"{group}/{name}": t for group in ("model", "optimizer", "ema") for name, t in ckpt.tensors.get(group, {}).items()}


# ---- gradient accumulation: with Adam betas 0 and eps = lr = 1e6, one AdamW step moves the parameters by -gradient ----

PLAIN_STEP = dict(steps=1, warmup_steps=0, lr=1e6, eps=1e6, beta1=0.0, beta2=0.0, grad_clip=0.0, checkpoint_every=100)


def one_step_delta(tmp_path, name, batches, *, weighted: bool) -> list[torch.Tensor]:
    """Parameter change of one step over the given micro-batches (each a tensor of rows)."""
    cfg = toy_config(tmp_path / name, grad_accum=len(batches), **PLAIN_STEP)
    cfg = cfg.replace(model={"dropout": 0.0})
    torch.manual_seed(0)
    before = [p.detach().clone() for p in toy_model(cfg.model).parameters()]

    def loss(model, rows):  # the sum over the rows when weighted, else the mean
        errors = (model(rows[:, :4]) - rows[:, 4:]).pow(2)
        return (errors.sum() if weighted else errors.mean()), {}

    with Trainer(cfg.train, cfg, name="toy") as trainer:
        model = toy_model(cfg.model)
        trainer.fit(model, loss=loss, batch=lambda step, micro: batches[micro], weight=(lambda rows: rows.shape[0]) if weighted else None)
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def reference_gradient(rows: torch.Tensor) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = toy_model(ToyModel(dropout=0.0))
    torch.nn.functional.mse_loss(model(rows[:, :4]), rows[:, 4:]).backward()  # the mean over every row of the step
    return [p.grad for p in model.parameters()]


def test_weighted_micro_batches_give_the_gradient_of_the_whole_step(tmp_path):
    """Micro-batches of 1 and 7 rows, each loss a sum, weight = rows: the step's gradient is that of the mean over
    all 8 rows (every row weighs the same), as transformer needs for tokens."""
    rows = DATA[:8]
    delta = one_step_delta(tmp_path, "weighted", [rows[:1], rows[1:]], weighted=True)
    for d, g in zip(delta, reference_gradient(rows)):
        assert_close(d, -g, rtol=1e-5, atol=1e-7)
    # the mean of per-micro-batch means weighs the lone row 7x too much: detectably another gradient
    wrong = one_step_delta(tmp_path, "means", [rows[:1], rows[1:]], weighted=False)
    assert max((d - w).abs().max() for d, w in zip(delta, wrong)) > 1e-3


def test_mean_micro_batches_average(tmp_path):
    """Equal micro-batches with mean losses: the step's gradient is the mean over all of them."""
    rows = DATA[:9]
    delta = one_step_delta(tmp_path, "mean", [rows[:3], rows[3:6], rows[6:]], weighted=False)
    for d, g in zip(delta, reference_gradient(rows)):
        assert_close(d, -g, rtol=1e-5, atol=1e-7)


# ---- exact resume -------------------------------------------------------------------------------------------


def test_ctrl_c_saves_and_the_same_command_resumes_bit_exactly(tmp_path):
    """Run A: 6 steps. Run B: Ctrl-C during step 3 -> a checkpoint at step 3 and Interrupted (exit status 130);
    the same command again resumes to 6. Parameters, optimizer, EMA (dropout draws random numbers, so the RNG
    must be restored) and the metrics log are identical."""
    fit_toy(toy_config(tmp_path / "a"))
    with pytest.raises(Interrupted, match="SIGINT at step 3") as stopped:
        fit_toy(toy_config(tmp_path / "b"), signal_at=3)
    assert stopped.value.exit_code == 130
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step_00000003.safetensors"
    fit_toy(toy_config(tmp_path / "b"))
    a, b = checkpoint_tensors(tmp_path / "a"), checkpoint_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and any(k.startswith("ema/") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows_a = [{k: v for k, v in r.items() if "per_s" not in k and k != "time"} for r in read_metrics(tmp_path / "a" / "metrics.jsonl")]
    rows_b = [{k: v for k, v in r.items() if "per_s" not in k and k != "time"} for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert rows_a == rows_b


def test_resume_needs_the_rng_state(tmp_path, monkeypatch):
    """The same interrupted run resumed without restoring the RNG draws other dropout masks: the test above can fail."""
    fit_toy(toy_config(tmp_path / "a"))
    with pytest.raises(Interrupted):
        fit_toy(toy_config(tmp_path / "b"), signal_at=3)
    monkeypatch.setattr(Trainer, "_restore_rng", lambda self, ckpt: None)
    fit_toy(toy_config(tmp_path / "b"))
    a, b = checkpoint_tensors(tmp_path / "a"), checkpoint_tensors(tmp_path / "b")
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_evaluation_leaves_training_randomness_alone(tmp_path):
    """An evaluation that draws random numbers, every step, changes nothing in training."""
    fit_toy(toy_config(tmp_path / "plain", eval_every=100))
    fit_toy(toy_config(tmp_path / "evaluated", eval_every=1), evaluate=lambda model, step: {"noise": float(torch.rand(()))})
    a, b = checkpoint_tensors(tmp_path / "plain"), checkpoint_tensors(tmp_path / "evaluated")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sum("valid/noise" in r for r in read_metrics(tmp_path / "evaluated" / "metrics.jsonl")) == 6


# ---- the run directory: lock, resume checks, leftovers -------------------------------------------------------------


def test_a_second_training_process_on_the_run_is_refused(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from axon_shared.training import RunLock; "
            "lock = RunLock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)",
            str(tmp_path / "run"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"in use by another training process \\(pid {holder.pid}\\)"):
            fit_toy(toy_config(tmp_path / "run"))
        assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    fit_toy(toy_config(tmp_path / "run", steps=1))  # the operating system dropped the dead holder's lock


def test_resume_with_another_model_config_names_the_fields(tmp_path):
    cfg = toy_config(tmp_path / "run", steps=2)
    fit_toy(cfg)
    saved = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(
        ConfigMismatchError, match=r"model\.dropout: 0\.3 in the checkpoints, 0\.1 now; model\.width: 8 in the checkpoints, 16 now"
    ):
        fit_toy(cfg.replace(model={"width": 16, "dropout": 0.1}))
    assert (tmp_path / "run" / "config.json").read_text() == saved  # checked first: nothing was rewritten
    fit_toy(cfg.replace(train={"steps": 3}))  # the train section may change


def test_a_torn_metrics_line_and_interrupted_checkpoint_writes_are_cleaned_up(tmp_path):
    cfg = toy_config(tmp_path / "run", steps=4)
    fit_toy(cfg)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "train/lo')  # a crash in the middle of a write
    partial = tmp_path / "run" / "checkpoints" / ".step_00000006.safetensors.x1y2.tmp"
    partial.write_bytes(b"\0" * 100)
    fit_toy(cfg.replace(train={"steps": 6}))
    assert not partial.exists()
    steps = [r["step"] for r in read_metrics(metrics) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    metrics.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(metrics)  # damage before the last line is not a torn write


def test_a_checkpoint_folder_that_cannot_be_written_fails_at_once(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("a file where the folder should be")
    started = time.time()
    with pytest.raises(AxonError, match="cannot write checkpoints to .*checkpoints"):
        fit_toy(toy_config(tmp_path / "run"))
    assert time.time() - started < 5
    (tmp_path / "file").write_text("")
    with pytest.raises(AxonError, match="cannot use .* as a run directory"):
        fit_toy(toy_config(tmp_path / "file" / "run"))


# ---- the time budget and the progress bar -----------------------------------------------------------------------


def test_the_time_budget_spans_resumes(tmp_path):
    """max_minutes bounds the whole run: a second invocation continues only while the saved elapsed time allows."""

    def slow_loss(model, rows):
        time.sleep(0.05)
        return torch.nn.functional.mse_loss(model(rows[:, :4]), rows[:, 4:]), {}

    from axon_shared.training import Trainer

    cfg = toy_config(tmp_path / "run", steps=1000, max_minutes=0.004, checkpoint_every=1000, eval_every=1000)  # 0.24 s

    def run():
        with Trainer(cfg.train, cfg, name="toy") as trainer:
            return trainer.fit(toy_model(cfg.model), loss=slow_loss, batch=lambda step, micro: DATA[:4])

    first = run()
    assert first["stopped"] == "time budget" and 2 <= first["step"] < 20
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert ckpt.step == first["step"] and ckpt.extra["elapsed"] >= 0.24
    second = run()
    assert second == {"step": first["step"], "minutes": pytest.approx(ckpt.extra["elapsed"] / 60), "stopped": "time budget"}
    assert list_checkpoints(tmp_path / "run" / "checkpoints")[-1] == ckpt.path


def test_bf16_trains_in_float32_with_a_note_where_the_cpu_only_emulates_it(tmp_path, monkeypatch, capsys):
    """Without native bf16 matmuls (an AVX2-only CPU) a bf16 run would be ~30x slower than float32: the engine trains
    in float32 (the losses are bitwise those of a bf16=false run) and says so once; where bf16 is native, it autocasts."""
    import axon_shared.training as training

    cpu = torch.device("cpu")
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):  # no AVX512: oneDNN has no bf16 path
        assert not training.native_bf16(cpu)

    def losses(name: str, bf16: bool) -> list[float]:
        cfg = toy_config(tmp_path / name, steps=3, log_every=1, bf16=bf16)
        fit_toy(cfg, ema=False)
        return [row["train/loss"] for row in read_metrics(tmp_path / name / "metrics.jsonl") if "train/loss" in row]

    seen: list[torch.dtype] = []

    def recording_loss(model, rows):
        out = model(rows[:, :4])
        seen.append(out.dtype)
        return torch.nn.functional.mse_loss(out.float(), rows[:, 4:]), {}

    monkeypatch.setattr(training, "native_bf16", lambda device: False)
    assert losses("emulated", True) == losses("fp32", False)
    assert capsys.readouterr().out.count("has no native bfloat16 matmul") == 1
    cfg = toy_config(tmp_path / "native", steps=1, bf16=True)
    for native, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(training, "native_bf16", lambda device, native=native: native)
        seen.clear()
        with Trainer(cfg.train, cfg, name="toy") as trainer:
            trainer.fit(toy_model(cfg.model), loss=recording_loss, batch=lambda step, micro: DATA[:4])
        assert seen == [dtype]
        shutil.rmtree(tmp_path / "native")


def test_the_progress_bar_says_what_bounds_the_run():
    by_time = RunProgress(desc="t", steps=100_000, start_step=0, elapsed=600.0, budget=1800.0, enabled=False)
    by_time.started -= 10.0  # 10 s for 10 steps: 100k steps would take a day; the budget ends the run in 19:50
    by_time.update(10)
    assert by_time.bar.status.startswith("step 10/100,000 | 19:50 left (time budget)")
    assert by_time.fill == int((610 / 1800) * 1000)  # the bar fills with the budget, not with 10 / 100,000 steps
    by_steps = RunProgress(desc="s", steps=100, start_step=0, elapsed=0.0, budget=1800.0, enabled=False)
    by_steps.started -= 10.0
    by_steps.update(50)
    assert "0:10 left (steps)" in by_steps.bar.status


def test_batch_indices_partition_steps_ranks_and_micro_batches():
    """The step's examples are cut into rank x micro-batch slices that together are the one-process batch."""
    whole = batch_indices(50, 12, 3, seed=7)
    parts = [batch_indices(50, 3, 3, seed=7, micro=m, rank=r, world_size=2, grad_accum=2) for m in range(2) for r in range(2)]
    assert sum(parts, []) == whole
    epoch = sum((batch_indices(50, 10, s, seed=7) for s in range(5)), [])
    assert sorted(epoch) == list(range(50))  # an epoch visits every example once
    assert batch_indices(50, 10, 5, seed=7) != batch_indices(50, 10, 0, seed=7)  # and the next is reshuffled


# ---- under torchrun (2 CPU processes, gloo) ----------------------------------------------------------------------


def torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AXON_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def test_ddp_weighted_accumulation_equals_one_process(tmp_path):
    """2 ranks x 2 micro-batches with 1, 5, 2 and 8 rows (sums weighted by rows): one step moves the parameters
    by minus the gradient of the mean over all 16 rows, as one process would."""
    result = torchrun("weighted", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    delta = load_file(tmp_path / "delta.safetensors")
    for d, g in zip([delta[str(i)] for i in range(len(delta))], reference_gradient(DATA[:16])):
        assert_close(d, -g, rtol=1e-5, atol=1e-7)


def test_ddp_stop_is_agreed_and_every_rank_resumes_its_own_random_stream(tmp_path):
    """SIGTERM reaches rank 1 only, during step 3: both ranks stop after step 3 (a rank stopping alone would leave
    the other waiting in the next all-reduce), save, and exit 143. The same command resumes to step 6, equal bit for
    bit to an uninterrupted 2-process run: each rank's RNG (dropout) was saved and restored."""
    straight = torchrun("toy", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = torchrun("toy", str(tmp_path / "resumed"), "--signal_at", "3")
    assert stopped.returncode != 0 and "SIGTERM at step 3" in stopped.stderr, stopped.stderr[-3000:]
    ranks = [json.loads((tmp_path / "resumed" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["stopped_at"] for r in ranks] == [3, 3]
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step_00000003.safetensors"
    resumed = torchrun("toy", str(tmp_path / "resumed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = checkpoint_tensors(tmp_path / "straight"), checkpoint_tensors(tmp_path / "resumed")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "resumed" / "checkpoints"))
    assert ckpt.extra["world_size"] == 2 and "1" in ckpt.extra["rng_ranks"]
