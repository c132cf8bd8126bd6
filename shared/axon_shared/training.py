"""The one training loop of Axon. transformer, x_llama, dali_ddpm and every instructgpt_rlhf stage train through
`Trainer.fit`; a package supplies only what is particular to its paper:

    model                       the nn.Module that trains (an nn.ModuleDict when several do: PPO's policy + value)
    batch(step, micro)          this rank's micro-batch `micro` of optimizer step `step` (both 0-based). It must be a
                                pure function of its arguments and the seed: a run resumed at step k then sees exactly
                                the data of an uninterrupted one, and the data position needs no state of its own.
    loss(model, batch)          -> (loss, metrics): the micro-batch's mean loss (with `weight=`, its sum) + floats
    evaluate(model, step)       -> held-out metrics (optional)
    schedule(step)              -> the learning rate of optimizer step `step` (a pure function: nothing to save)

and the loop owns the rest, the same way for every package: gradient accumulation, clipping, bf16 autocast,
torch.compile, EMA, checkpoints with exact resume (parameters, optimizer, EMA, every rank's RNG), the whole-run time
budget, a stop decision all ranks agree on, Ctrl-C / SIGTERM (save, then stop), metrics JSONL and plots, the progress
bar, and DDP / FSDP wrapping under torchrun.

    with Trainer(cfg.train, cfg, name="x_llama") as trainer:     # lock the run dir, check a resume, write config.json
        model = Llama(cfg.model)
        trainer.fit(model, loss=loss, batch=batch, evaluate=evaluate, schedule=schedule)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .checkpoint import (
    Checkpoint,
    _unflatten_optimizer,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    remove_partial_writes,
    save_checkpoint,
)
from .config import AxonConfig, ConfigError, require, require_positive
from .distributed import (
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_from_main,
    cleanup_distributed,
    full_state_dicts,
    gather_to_main,
    load_full_optimizer_state,
    set_threads,
    setup_distributed,
    wrap_model,
)
from .ema import EMA
from .errors import AxonError, ConfigMismatchError, Interrupted, RunLockedError
from .metrics import MetricsLogger, plot_metrics
from .progress import RunProgress
from .schedules import WarmupConstantSchedule, set_lr
from .seed import capture_rng_state, restore_rng_state, seed_everything


@dataclass
class TrainSection(AxonConfig):
    """The `train` section of every package's config: one name for each concept. A package subclasses it to change
    defaults (its paper's values) or to add fields of its own."""

    out_dir: str = "runs/run"  # the run directory: config.json, metrics.jsonl, plots, checkpoints/
    steps: int = 1000  # optimizer steps; the run ends here (or at max_minutes, whichever comes first)
    batch_size: int = 32  # per micro-batch and rank, in the package's unit (examples; tokens for transformer)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    warmup_steps: int = 0  # linear warm-up to lr
    grad_clip: float = 1.0  # maximum global gradient norm; 0 = no clipping
    weight_decay: float = 0.0  # decoupled (AdamW), on >= 2-D parameters only
    beta1: float = 0.9  # Adam
    beta2: float = 0.999
    eps: float = 1e-8
    bf16: bool = False  # autocast the training forward passes to bfloat16 (evaluation stays float32)
    compile: bool = False  # torch.compile(fullgraph=True) the training forward and loss (one graph per micro-batch)
    max_minutes: float | None = None  # time budget for the whole run, across resumes; null = none
    eval_every: int = 100  # steps between evaluations (and at the last step)
    checkpoint_every: int = 100  # steps between checkpoints (and at the last step)
    keep_last: int = 2  # checkpoints kept on disk
    log_every: int = 10  # steps between metrics rows (and the first and last step)
    seed: int = 0
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...
    fsdp: bool = False  # under torchrun: FSDP2 (each block sharded) instead of DDP; for models that name their blocks
    progress: bool = True  # the progress bar

    def validate(self) -> None:
        require_positive(self, "steps", "batch_size", "grad_accum", "eval_every", "checkpoint_every", "keep_last", "log_every", "eps")
        require(self.lr is None or self.lr > 0, self, "lr", "must be > 0")  # a package may let null mean its paper's rule
        require(self.warmup_steps >= 0, self, "warmup_steps", "must be >= 0")
        require(self.grad_clip >= 0, self, "grad_clip", "must be >= 0 (0 = no clipping)")
        require(self.weight_decay >= 0, self, "weight_decay", "must be >= 0")
        require(
            0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, self, "beta1", f"Adam betas must be in [0, 1), got ({self.beta1}, {self.beta2})"
        )
        if self.max_minutes is not None:
            require(self.max_minutes > 0, self, "max_minutes", "must be > 0 minutes, or null for no time limit")
        try:
            device = torch.device("cpu" if self.device == "auto" else self.device)
        except RuntimeError:
            device = None
        require(device is not None and device.type in ("cpu", "cuda", "mps", "xpu"), self, "device", "must be auto, cpu, cuda or cuda:N")


class Stateful(Protocol):
    """Anything else a run must checkpoint (e.g. PPO's adaptive KL coefficient), as JSON values."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LossFn = Callable[[nn.Module, Any], tuple[Tensor, dict[str, float]]]
BatchFn = Callable[[int, int], Any]
EvalFn = Callable[[nn.Module, int], dict[str, float]]


class Trainer:
    """One training run in one directory. Opening it checks everything that can be checked before work is done or
    files are written: that no other process trains there (a lock), that a resume is compatible with the
    checkpoints (`frozen` config sections must match), and that checkpoints can be written. Then `fit` trains."""

    def __init__(self, section: TrainSection, config: AxonConfig, *, name: str, frozen: Sequence[str] = ("model",)):
        self.cfg, self.config, self.name = section, config, name
        self.out_dir = Path(section.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self._threads_before = torch.get_num_threads()
        set_threads()  # $AXON_THREADS
        self.ctx = setup_distributed(section.device)  # checks the device (ConfigError naming the fix)
        if section.bf16 and not native_bf16(self.ctx.device):  # bf16_autocast then runs float32
            print(
                f"{name}: train.bf16 is on, but this {self.ctx.device.type} has no native bfloat16 matmul ({_bf16_hardware(self.ctx.device)}), "
                "where bf16 runs ~30x slower than float32: training in float32 (--train.bf16 false says so and silences this note)"
            )
        self._lock = None
        try:
            self._open(frozen)
        except BaseException:
            self.close()
            raise
        seed_everything(section.seed)  # the same on every rank: models start identical (FSDP does not broadcast)
        self.trained_steps = 0

    # ---- opening and closing the run ----------------------------------------------------------------------------
    def _open(self, frozen: Sequence[str]) -> None:
        problem = None
        if self.ctx.is_main:
            try:
                self._lock = RunLock(self.out_dir)
                _check_writable(self.checkpoint_dir)
                for stale in remove_partial_writes(self.checkpoint_dir):
                    print(f"{self.name}: removed {stale.name}, left by a checkpoint write that a crash interrupted")
            except AxonError as error:
                problem = error
        problem = broadcast_from_main(problem, self.ctx)  # every rank fails together, or none does
        if problem is not None:
            raise problem
        latest = latest_checkpoint(self.checkpoint_dir)
        self.checkpoint: Checkpoint | None = load_checkpoint(latest, map_location=self.ctx.device) if latest else None
        if self.checkpoint is not None:
            differences = [
                d
                for section in frozen
                for d in _differences(self.checkpoint.config.get(section), self.config.to_dict().get(section), section)
            ]
            if differences:
                raise ConfigMismatchError(
                    f"{self.out_dir} holds a run trained with another {' / '.join(frozen)} config: {'; '.join(differences)}. "
                    f"Resume with the same values, or start a new run with another --train.out_dir"
                )
        if self.ctx.is_main:  # checked first, written after: a refused resume leaves the run directory as it was
            (self.out_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        cleanup_distributed()
        torch.set_num_threads(self._threads_before)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def start_step(self) -> int:
        return self.checkpoint.step if self.checkpoint is not None else 0

    def batch_indices(self, n: int, step: int, micro: int = 0) -> list[int]:
        """This rank's `train.batch_size` examples (of n) for micro-batch `micro` of step `step`; see batch_indices."""
        cfg, ctx = self.cfg, self.ctx
        return batch_indices(
            n, cfg.batch_size, step, cfg.seed, micro=micro, rank=ctx.rank, world_size=ctx.world_size, grad_accum=cfg.grad_accum
        )

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on rank 0 first, then on the other ranks, which then find rank 0's files (a tokenizer, a
        token cache) instead of writing them at the same time."""
        if not self.ctx.is_main:
            barrier(self.ctx)
        yield
        if self.ctx.is_main:
            barrier(self.ctx)

    # ---- the loop ---------------------------------------------------------------------------------------------
    def fit(
        self,
        model: nn.Module,
        *,
        loss: LossFn | None = None,
        batch: BatchFn | None = None,
        step: Callable[[int], dict[str, float]] | None = None,
        evaluate: EvalFn | None = None,
        evaluate_first: bool = False,
        schedule: Callable[[int], float] | None = None,
        ema: EMA | None = None,
        weight: Callable[[Any], float] | None = None,
        count: Callable[[Any], int] | int | None = None,
        unit: str = "samples",
        blocks: Iterable[nn.Module] | None = None,
        state: dict[str, Stateful] | None = None,
        extra: dict[str, Any] | None = None,
        plots: dict[str, Sequence[str]] | None = None,
    ) -> dict[str, Any]:
        """Train from the latest checkpoint (or from scratch) to `steps` optimizer steps or the time budget.

        Either `loss` + `batch` (the usual step: micro-batches, backward, clip, optimizer step) or `step`, a function
        doing one whole step itself with `self.update(loss)` for each optimizer update (PPO: a rollout, then several
        minibatch updates). `weight(batch)`: the micro-batch's share of the step (transformer: its target tokens);
        then `loss` returns the micro-batch's sum and the step's gradient is that of sum / total weight over every
        micro-batch of every rank. `count(batch)` (or an int per step): `unit`s for the throughput metric.
        `blocks`: the units FSDP shards. `state`: more objects to checkpoint. `extra`: JSON saved in every checkpoint.
        `plots`: {png name: metric keys} drawn into the run directory at the end. Returns the last metrics."""
        if (step is None) == (loss is None or batch is None):
            raise TypeError("fit needs either loss= and batch=, or step=")
        cfg, ctx = self.cfg, self.ctx
        if cfg.fsdp and ctx.is_distributed and (blocks is None or ema is not None or step is not None):
            raise ConfigError(
                f"{type(cfg).__name__}.fsdp=True: {self.name} does not support FSDP (it needs a model that names its blocks, no EMA and the usual step); use DDP (fsdp false)"
            )
        if cfg.compile and step is not None:
            raise ConfigError(f"{type(cfg).__name__}.compile=True: {self.name} does its own step and is not compiled; set compile false")
        schedule = schedule or WarmupConstantSchedule(cfg.lr, cfg.warmup_steps)
        state = state or {}

        # ---- the model, the optimizer, and what a checkpoint restores -------------------------------------------
        model.to(ctx.device)
        if self.checkpoint is not None:  # parameters first: FSDP then shards what was loaded
            self.checkpoint.restore(model, rng=False)
        sharded = cfg.fsdp and ctx.is_distributed
        wrapped = wrap_model(model, ctx, fsdp=cfg.fsdp, blocks=blocks)
        self.model, self.params = model, [p for p in model.parameters() if p.requires_grad]
        # built after wrapping (FSDP2 replaces the parameters with sharded ones); the schedule sets the lr of each step
        self.optimizer = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=0.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        start, elapsed_before, counted = 0, 0.0, 0
        if self.checkpoint is not None:
            ckpt = self.checkpoint
            start, elapsed_before, counted = ckpt.step, float(ckpt.extra.get("elapsed", 0.0)), int(ckpt.extra.get("counted", 0))
            if sharded:
                load_full_optimizer_state(
                    model, self.optimizer, _unflatten_optimizer(ckpt.tensors.get("optimizer", {}), ckpt.state["optimizer"])
                )
            else:
                ckpt.restore(optimizer=self.optimizer, rng=False)
            if ema is not None:
                if "ema" not in ckpt.tensors:
                    raise ConfigError(
                        f"{self.name}: the checkpoint to resume from (step {ckpt.step} in {self.out_dir}) holds no EMA weights, so the run "
                        "trained without an EMA; resume it without one, or start a new run (another --train.out_dir) with it"
                    )
                ckpt.restore(ema=ema, rng=False)
            for key, obj in state.items():
                obj.load_state_dict(ckpt.extra["state"][key])
            self._restore_rng(ckpt)
        elif ctx.rank > 0:  # every rank built the same model from the seed; from here on each draws its own numbers
            seed_everything(rank_seed(cfg.seed, ctx.rank))
        # the model call and the loss are compiled together (fused cross-entropy: 1.4x the compiled model alone, x_llama
        # bf16); fullgraph, so a graph break is an error naming its cause rather than a silent slow path
        compute_loss = _compiled(loss, self.name, type(cfg).__name__) if cfg.compile and loss is not None else loss
        logger = MetricsLogger(self.out_dir / "metrics.jsonl", enabled=ctx.is_main, resume_step=start if self.checkpoint else None)
        budget = 60.0 * cfg.max_minutes if cfg.max_minutes is not None else None
        if budget is not None and elapsed_before >= budget:
            print(
                f"{self.name}: the time budget of {cfg.max_minutes:g} min is already used ({elapsed_before / 60:.1f} min) at step {start}; raise --train.max_minutes to continue"
            )
            return {"step": start, "minutes": elapsed_before / 60, "stopped": "time budget"}
        if start >= cfg.steps:
            print(f"{self.name}: the run in {self.out_dir} is already at step {start} of {cfg.steps}; raise --train.steps to continue")
            return {"step": start, "minutes": elapsed_before / 60, "stopped": "steps"}

        started = time.monotonic()
        elapsed = lambda: elapsed_before + time.monotonic() - started
        bar = RunProgress(
            desc=self.name, steps=cfg.steps, start_step=start, elapsed=elapsed_before, budget=budget, enabled=ctx.is_main and cfg.progress
        )
        window = _Window()
        last: dict[str, Any] = {}
        stop_reason = "steps"

        def run_evaluation(at: int) -> None:
            model.eval()
            # in float32 whatever train.bf16 says (bf16 rounding moved dali_ddpm's valid L_simple by 8%), and evaluating
            # never shifts training's random numbers
            with torch.no_grad(), _rng_untouched():
                values = {f"valid/{k}": float(v) for k, v in evaluate(model, at).items()}
            model.train()
            logger.log(at, **values)
            last.update(values)

        model.train()
        if evaluate is not None and evaluate_first and start == 0:
            run_evaluation(0)  # where training starts from (a policy's reward and KL before any update)
        window.restart()
        with _StopSignals() as signals:
            for step_index in range(start, cfg.steps):
                # 1. the learning rate of this step: a pure function of the step, so resuming needs no scheduler state
                lr = schedule(step_index)
                set_lr(self.optimizer, lr)
                if step is not None:
                    # 2'. a step that updates by itself (PPO), through self.update
                    metrics, grad_norm, n = step(step_index), self._last_grad_norm, count if isinstance(count, int) else 0
                else:
                    # 2. this rank's micro-batches, and each one's share of the step's gradient
                    micro = [batch(step_index, i) for i in range(cfg.grad_accum)]
                    # weighted: sum over the step / total weight of the step on all ranks (DDP averages the ranks' gradients);
                    # else the mean over the micro-batches
                    if weight is not None:
                        local = sum(weight(b) for b in micro)
                        scale = ctx.world_size / float(all_reduce_sum(torch.tensor(float(local), dtype=torch.float64), ctx))
                    # 3. forward (autocast) and backward per micro-batch; DDP all-reduces gradients on the last one only
                    sums: dict[str, float] = {}
                    for i, b in enumerate(micro):
                        no_sync = wrapped.no_sync() if i < len(micro) - 1 and hasattr(wrapped, "no_sync") else contextlib.nullcontext()
                        with no_sync:
                            with bf16_autocast(ctx.device, cfg.bf16):
                                value, parts = compute_loss(wrapped, b)
                            (value * scale if weight is not None else value / cfg.grad_accum).backward()
                        for key, v in {"loss": value.detach(), **parts}.items():
                            sums[key] = sums.get(key, 0.0) + float(v)
                    divisor = local if weight is not None else len(micro)
                    metrics = {key: v / divisor for key, v in sums.items()}
                    n = sum(count(b) for b in micro) if callable(count) else (count or 0)
                    # 4. clip the global gradient norm, step the optimizer, clear the gradients
                    grad_norm = self._optimizer_step()
                # 5. the EMA of the weights follows every optimizer step
                if ema is not None:
                    ema.update(model, step_index)
                done = step_index + 1
                self.trained_steps += 1
                counted += n
                window.add(metrics, n)
                # 6. stop? the step count, the time budget or a signal; every rank decides the same
                out_of_time = budget is not None and elapsed() >= budget
                stop = any_rank(out_of_time or signals.received is not None, ctx) and done < cfg.steps
                final = done == cfg.steps or stop
                if stop:
                    stop_reason = "interrupted" if any_rank(signals.received is not None, ctx) else "time budget"
                # 7. log the window's mean metrics (all ranks), the learning rate, throughput and gradient norm
                if done % cfg.log_every == 0 or done == 1 or final:
                    row = window.summary(ctx, unit) | {"lr": lr, "grad_norm": float(grad_norm), unit: counted}
                    logger.log(done, **row)
                    last.update(row)
                    bar.update(done, row)
                    window.restart()
                else:
                    bar.update(done)
                # 8. evaluate (not when interrupted: the user is waiting) and checkpoint
                if evaluate is not None and (done % cfg.eval_every == 0 or final) and stop_reason != "interrupted":
                    run_evaluation(done)
                    window.restart()  # keep evaluation time out of the throughput
                if done % cfg.checkpoint_every == 0 or final:
                    self._save(done, last, ema, state, extra, elapsed(), counted, sharded)
                    window.restart()
                if stop:
                    break
        bar.close()
        done = start + self.trained_steps
        last.update(step=done, minutes=round(elapsed() / 60, 2), stopped=stop_reason)
        if ctx.is_main:
            self._plot(plots)
        # every rank leaves together: under torchrun a rank that exits first (143 after a signal) makes the agent
        # kill the others, which would cut the main rank's plots short
        barrier(ctx)
        if stop_reason == "interrupted":
            received = signals.received or signal.SIGTERM
            raise Interrupted(
                f"{signal.Signals(received).name} at step {done}: saved {checkpoint_path(self.checkpoint_dir, done)}; run the same command to resume",
                received,
                done,
            )
        if ctx.is_main and stop_reason == "time budget":
            print(
                f"{self.name}: time budget of {cfg.max_minutes:g} min reached at step {done}; checkpoint saved (raise --train.max_minutes to continue)"
            )
        return last

    # ---- pieces of a step -----------------------------------------------------------------------------------
    _last_grad_norm: float = 0.0

    def _optimizer_step(self) -> float:
        """Clip the global gradient norm (when grad_clip > 0), step, clear the gradients; return the norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._last_grad_norm = float(norm)
        return self._last_grad_norm

    def update(self, loss: Tensor) -> float:
        """For `fit(step=...)`: backward `loss`, clip, step the optimizer. Returns the gradient norm before clipping."""
        loss.backward()
        return self._optimizer_step()

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def _save(
        self,
        step: int,
        metrics: dict,
        ema: EMA | None,
        state: dict[str, Stateful],
        extra: dict | None,
        elapsed: float,
        counted: int,
        sharded: bool,
    ) -> None:
        """Every rank takes part (gathering FSDP shards and the ranks' RNG states are collectives); rank 0 writes."""
        model_state, optimizer_state = full_state_dicts(self.model, self.optimizer) if sharded else (self.model, self.optimizer)
        rng_states = gather_to_main(capture_rng_state(), self.ctx)
        if not self.ctx.is_main:
            return
        saved = {
            **(extra or {}),
            "elapsed": elapsed,
            "counted": counted,
            "world_size": self.ctx.world_size,
            "state": {key: obj.state_dict() for key, obj in state.items()},
            "rng_ranks": {str(rank): values for rank, (_, values) in enumerate(rng_states) if rank > 0},
        }
        save_checkpoint(
            checkpoint_path(self.checkpoint_dir, step),
            model=model_state,
            optimizer=optimizer_state,
            ema=ema,
            step=step,
            config=self.config.to_dict(),
            metrics={k: v for k, v in metrics.items() if isinstance(v, int | float)},
            extra=saved,
            extra_tensors={f"rng_rank{rank}": tensors for rank, (tensors, _) in enumerate(rng_states) if rank > 0},
        )
        prune_checkpoints(self.checkpoint_dir, self.cfg.keep_last)

    def _restore_rng(self, ckpt: Checkpoint) -> None:
        """Each rank continues its own random stream, saved at the checkpoint."""
        rank = self.ctx.rank
        if rank == 0 and "rng" in ckpt.state:
            restore_rng_state(ckpt.tensors["rng"], ckpt.state["rng"])
        elif rank > 0 and str(rank) in ckpt.extra.get("rng_ranks", {}):
            restore_rng_state(ckpt.tensors[f"rng_rank{rank}"], ckpt.extra["rng_ranks"][str(rank)])
        else:  # the run was saved with fewer processes: a fresh stream (still deterministic, no longer bit-exact)
            if self.ctx.is_main or rank == 1:
                warnings.warn(
                    f"{ckpt.path} was saved by {ckpt.extra.get('world_size', 1)} process(es); rank {rank} starts a new random stream",
                    stacklevel=3,
                )
            seed_everything(rank_seed(self.cfg.seed, rank, ckpt.step))

    def _plot(self, plots: dict[str, Sequence[str]] | None) -> None:
        plots = plots if plots is not None else {"loss.png": ("train/loss", "valid/loss")}
        for name, keys in plots.items():
            with contextlib.suppress(ValueError):  # no rows for these keys yet
                plot_metrics(self.out_dir / "metrics.jsonl", self.out_dir / name, list(keys), title=f"{self.name}: {self.out_dir.name}")


# ---- helpers the packages use --------------------------------------------------------------------------------------


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups: weight decay on matrices and embeddings (>= 2-D), none on gains and biases, nor on
    a matrix that marks itself `no_weight_decay = True` (hyper-connections' identity-initialised stream mixing A_r,
    which decay would pull towards cutting the residual path)."""
    trainable = [p for p in model.parameters() if p.requires_grad]

    def decays(p: nn.Parameter) -> bool:
        return p.ndim >= 2 and not getattr(p, "no_weight_decay", False)

    return [
        {"params": [p for p in trainable if decays(p)], "weight_decay": weight_decay},
        {"params": [p for p in trainable if not decays(p)], "weight_decay": 0.0},
    ]


def _compiled(loss: Callable, name: str, section: str) -> Callable:
    """`torch.compile(loss, fullgraph=True)`, with a failure to capture one graph reported as a ConfigError naming its
    cause (the first line of dynamo's message, which points at the user code) and the way out."""
    compiled = torch.compile(loss, fullgraph=True)

    def call(*args):
        try:
            return compiled(*args)
        except torch._dynamo.exc.TorchDynamoException as error:
            cause = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise ConfigError(
                f"{section}.compile=True: {name}'s training loss does not compile to one graph ({cause}); set compile false"
            ) from error

    return call


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively, i.e. faster than float32: a CUDA GPU with bf16 (Ampere
    and newer), a CPU for which oneDNN has a bf16 path (x86 with AVX512 or AMX, ARM with its bf16 extensions).

    Elsewhere, e.g. an x86 CPU with AVX2 only (AMD Zen 1-3, most Intel laptop CPUs), a bf16 matmul falls back to a
    scalar loop: 0.93 against 144 GFLOP/s in float32 on a 2-core AMD EPYC (AVX2), measured 2026-12-06; the x_llama
    `cpu` preset trained at 98 tokens/s under bf16 autocast against 2,934 in float32 there."""
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a torch built without oneDNN: no fast bf16 kernels either
            return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return True


def _bf16_hardware(device: torch.device) -> str:
    """What the device has, for the note that bf16 is not native: its vector instructions, or the GPU's name."""
    if device.type == "cpu":
        return f"its vector instructions are {torch.backends.cpu.get_cpu_capability()}; oneDNN's bf16 needs AVX512 or AMX"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}; bf16 needs compute capability 8.0 or newer"
    return device.type


def bf16_autocast(device: torch.device, enabled: bool):
    """Autocast to bfloat16 on `device` when enabled (`train.bf16`) and the device multiplies bf16 natively
    (`native_bf16`); a no-op context otherwise, so a bf16 preset trains in float32 where bf16 would be ~30x slower
    (the Trainer says so when it opens the run)."""
    if enabled and native_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_indices(
    n: int, batch_size: int, step: int, seed: int, *, micro: int = 0, rank: int = 0, world_size: int = 1, grad_accum: int = 1
) -> list[int]:
    """Indices (among `n` examples) of this rank's `batch_size` examples for micro-batch `micro` of optimizer step
    `step` (0-based). The examples are visited epoch after epoch, each epoch in its own seeded random order; a step
    takes the next batch_size * world_size * grad_accum of them (so it may span two epochs) and each rank and
    micro-batch its slice. A pure function of its arguments: a resumed run draws exactly the batches of an
    uninterrupted one."""
    if n < 1:
        raise ValueError("batch_indices: no examples to draw from")
    per_step = batch_size * world_size * grad_accum
    out: list[int] = []
    position = step * per_step + (micro * world_size + rank) * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(batch_size - len(out), n - offset)
        out += order[offset : offset + take].tolist()
        position += take
    return out


def count_parameters(model: nn.Module) -> int:
    """Distinct trainable parameters (a tied matrix counts once: `parameters()` yields each tensor once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A seed for rank > 0's own random stream (rank 0 keeps `seed` itself)."""
    return seed + 1_000_003 * rank + 7_919 * step


# ---- internals --------------------------------------------------------------------------------------------------


class RunLock:
    """An exclusive lock on a run directory (`<run>/.lock`, holding the owner's pid). The operating system releases
    it when the process ends, however it ends, so a crash never leaves a stale lock behind."""

    def __init__(self, run_dir: Path):
        import fcntl

        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.handle = open(run_dir / ".lock", "a+")  # noqa: SIM115 (held open until release)
        except OSError as error:
            raise AxonError(
                f"cannot use {run_dir} as a run directory ({error.strerror or error}); choose another --train.out_dir"
            ) from None
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "unknown"
            self.handle.close()
            raise RunLockedError(
                f"{run_dir} is in use by another training process (pid {holder}); wait for it to end, or use another --train.out_dir"
            ) from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"{os.getpid()}\n")
        self.handle.flush()

    def release(self) -> None:
        import fcntl

        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def _check_writable(directory: Path) -> None:
    """Fail now, not at the first save after minutes of work, if checkpoints cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_test_"):
            pass
    except OSError as error:
        raise AxonError(
            f"cannot write checkpoints to {directory} ({error.strerror or error}); fix its permissions or choose another --train.out_dir"
        ) from None


def _differences(saved: Any, requested: Any, where: str) -> list[str]:
    """Leaf fields that differ between two config trees, as 'model.dim: 64 in the checkpoints, 32 now'."""
    if isinstance(saved, dict) and isinstance(requested, dict):
        return [
            d for key in sorted(set(saved) | set(requested)) for d in _differences(saved.get(key), requested.get(key), f"{where}.{key}")
        ]
    plain = lambda value: list(value) if isinstance(value, tuple) else value
    if plain(saved) == plain(requested):
        return []
    return [f"{where}: {saved!r} in the checkpoints, {requested!r} now"]


@contextlib.contextmanager
def _rng_untouched() -> Iterator[None]:
    tensors, values = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(tensors, values)


class _Window:
    """Metrics averaged over the steps since the last log row, and the throughput over their wall time."""

    def restart(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.units, self.started = 0, 0, time.monotonic()

    def add(self, metrics: dict[str, float], units: int) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.steps += 1
        self.units += units

    def summary(self, ctx, unit: str) -> dict[str, float]:
        keys = sorted(self.sums)
        values = torch.tensor([self.sums[k] / max(self.steps, 1) for k in keys] + [float(self.units)], dtype=torch.float64)
        if ctx.is_distributed:  # mean of the metrics over ranks, sum of the units
            values = all_reduce_sum(values, ctx)
            values[:-1] /= ctx.world_size
        seconds = max(time.monotonic() - self.started, 1e-9)
        row = {f"train/{k}": float(v) for k, v in zip(keys, values[:-1].tolist())}
        if self.units or values[-1] > 0:
            row[f"{unit}_per_s"] = float(values[-1]) / seconds
        return row


class _StopSignals:
    """While training, SIGINT (Ctrl-C) and SIGTERM ask the loop to stop after the current step and save. A second
    Ctrl-C interrupts at once (the previous handler is back)."""

    def __init__(self):
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python lets only the main thread set handlers
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame) -> None:
        self.received = number
        signal.signal(number, self.previous[number])
        print(
            f"\n{signal.Signals(number).name}: stopping after this step and saving a checkpoint (press Ctrl-C again to quit at once)",
            flush=True,
        )

    def __exit__(self, *exc_info) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
