"""`x-llama ablate`: the architecture lab's one honest comparison (README, "The architecture lab: ablation").

Every variant trains from the same preset (the `cpu` size by default) on en-text with the same tokenizer, the same
token budget (steps x batch x seq_len), the same data order for a given seed and the same precision mode, one run
after another, each in its own process (so its peak memory is its own). Then each run is measured the same way:

- valid perplexity on fixed windows at the training context, and at 2x and 4x it (length extrapolation: every
  model is built with max_seq_len = 4 x seq_len, so RoPE's table covers the longer windows too);
- total and active parameters (active = what one token uses: the routed experts only);
- training tokens/s (the run's median logged throughput), peak resident memory of the training process;
- cached greedy decode tokens/s at batch 1.

The token budget is `--steps`, or, when that is null, what the baseline trains in `--minutes` minutes, measured
once by timing a few baseline steps (plan.json keeps it, so a resumed ablation keeps its budget). Runs resume:
a finished run is not retrained, an interrupted one continues from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from axon_shared.checkpoint import run_checkpoints
from axon_shared.training import bf16_autocast

from .config import AblateConfig, TrainConfig
from .data import batch_at, build_tokenizer, share_token_caches, step_seed, token_stream
from .model import Llama, lm_loss

# Each variant's model overrides. Sizes keep the parameters roughly matched to the baseline: MoE's experts are
# half the dense hidden size so that top-2 routing matches the dense FFN's *active* parameters (8 experts: 4x its
# total); PEER's 1,024 singleton experts (2 x dim each) plus its query networks match the dense FFN's *total*.
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "alibi": {"position": "alibi"},
    "nope": {"position": "nope"},
    "diff": {"attention": "differential"},
    "moe": {"ffn": "moe", "moe": {"n_experts": 8, "top_k": 2, "hidden_dim": "half"}},
    "mod": {"router": "mod"},
    "peer": {"ffn": "peer", "peer": {"n_experts": 1024, "heads": 4, "top_k": 16}},
    "hyper": {"residual": "hyper"},
    # praxis's combination: differential attention, ALiBi, Mixture-of-Depths, MoE experts, hyper-connections
    "praxis": {
        "position": "alibi",
        "attention": "differential",
        "router": "mod",
        "ffn": "moe",
        "residual": "hyper",
        "moe": {"n_experts": 8, "top_k": 2, "hidden_dim": "half"},
    },
}


def variant_train_config(cfg: AblateConfig, variant: str, seed: int, steps: int) -> TrainConfig:
    """The TrainConfig of one (variant, seed) run."""
    base = TrainConfig.from_preset(cfg.base)
    model = dict(VARIANTS[variant])
    if isinstance(model.get("moe", {}).get("hidden_dim"), str):  # "half": the dense hidden size / top_k
        model["moe"] = dict(model["moe"], hidden_dim=base.model.hidden_dim // model["moe"]["top_k"])
    model["max_seq_len"] = max(base.model.max_seq_len, 4 * base.data.seq_len)
    out_dir = Path(cfg.out_dir) / f"{variant}-s{seed}"
    train = {
        "out_dir": str(out_dir),
        "steps": steps,
        "seed": seed,
        "bf16": cfg.bf16,
        "compile": cfg.compile,
        "warmup_steps": min(base.train.warmup_steps, max(1, steps // 10)),
        "eval_every": max(1, steps // 4),
        "checkpoint_every": max(1, steps // 4),
        "max_minutes": None,
        "progress": False,
    }
    data = {"tokenizer": str(Path(cfg.out_dir) / "data" / "tokenizer.model")}
    return base.replace(model=model, train=train, data=data)


def prepare_data(cfg: AblateConfig) -> Path:
    """One tokenizer and one set of token caches for every run (out_dir/data), hard-linked into each run."""
    base = TrainConfig.from_preset(cfg.base)
    data_dir = Path(cfg.out_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(base.data, base.model.vocab_size, data_dir)
    data = base.data.replace(tokenizer=str(data_dir / "tokenizer.model"))
    for split in ("train", "valid"):
        token_stream(data, tokenizer, split, data_dir)
    return data_dir


def plan_steps(cfg: AblateConfig) -> int:
    """The token budget in steps: --steps, or the baseline's steps in --minutes (timed once, kept in plan.json)."""
    plan_file = Path(cfg.out_dir) / "plan.json"
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())
        return int(plan["steps"])
    if cfg.steps is not None:
        steps, seconds_per_step = cfg.steps, None
    else:
        seconds_per_step = _time_baseline_step(cfg)
        steps = max(1, int(60 * cfg.minutes / seconds_per_step))
    plan_file.write_text(json.dumps({"steps": steps, "seconds_per_baseline_step": seconds_per_step, "minutes": cfg.minutes}, indent=2))
    return steps


def _time_baseline_step(cfg: AblateConfig, warmup: int = 3, timed: int = 8) -> float:
    """Seconds per baseline training step (forward, backward, AdamW) at the preset's batch, in the ablation's
    precision (bf16 autocast or fp32), eager: a throughput estimate, not a benchmark."""
    train_cfg = variant_train_config(cfg, "baseline", 0, 1)
    torch.manual_seed(0)
    model = Llama(train_cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, train_cfg.model.vocab_size, (train_cfg.train.batch_size, train_cfg.data.seq_len + 1))
    elapsed = 0.0
    for index in range(warmup + timed):
        start = time.perf_counter()
        with bf16_autocast(torch.device("cpu"), cfg.bf16):
            loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= warmup:
            elapsed += time.perf_counter() - start
    return elapsed / timed


def run_training(train_cfg: TrainConfig, data_dir: Path) -> dict[str, float]:
    """Train one run in a child process (resuming if it has checkpoints); its peak resident memory in MiB."""
    out_dir = Path(train_cfg.train.out_dir)
    share_token_caches(data_dir, out_dir, train_cfg.data.tokenizer)
    config_file = out_dir / "ablate_config.json"
    config_file.write_text(train_cfg.to_json())
    with open(out_dir / "train.log", "a") as log:
        command = [sys.executable, "-m", "x_llama.cli", "train", "--config", str(config_file)]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # wait4: this child's own resource usage
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"training {out_dir} failed (exit {process.returncode}); see {out_dir / 'train.log'}")
    return {"peak_memory_mib": usage.ru_maxrss / 1024}  # Linux reports KiB


def _finished(train_cfg: TrainConfig) -> bool:
    try:
        _, paths = run_checkpoints(train_cfg.train.out_dir)
    except Exception:
        return False
    metrics = Path(train_cfg.train.out_dir) / "metrics.jsonl"
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    return bool(paths) and max(steps, default=0) >= train_cfg.train.steps


@torch.no_grad()
def measure_run(train_cfg: TrainConfig, eval_windows: int, decode_tokens: int = 128) -> dict[str, float]:
    """Perplexity at 1x/2x/4x the training context (same number of tokens each), parameters, decode speed."""
    from .generation import generate
    from .train import load_pretrained

    out_dir = Path(train_cfg.train.out_dir)
    model, tokenizer, _ = load_pretrained(out_dir)
    valid = token_stream(train_cfg.data, tokenizer, "valid", out_dir)
    seq_len = train_cfg.data.seq_len
    result: dict[str, float] = {"params": model.num_parameters(), "active_params": model.active_parameters()}
    for factor in (1, 2, 4):
        length, windows = seq_len * factor, max(1, eval_windows // factor)
        total = 0.0
        for index in range(windows):  # one window per call: the same windows for every variant
            inputs, targets = batch_at(valid, 1, length, step_seed(0, 0, index, 777 + factor))
            total += float(lm_loss(model(inputs), targets))
        result[f"ppl_{factor}x"] = math.exp(total / windows)
    prompt = tokenizer.encode("It is a truth universally acknowledged", bos=True)
    generate(model, [prompt], 8, temperature=0.0)  # warm-up
    start = time.perf_counter()
    new = generate(model, [prompt], decode_tokens, temperature=0.0)[0]
    result["decode_tokens_per_s"] = len(new) / (time.perf_counter() - start)
    throughput = [
        json.loads(line)["tokens_per_s"] for line in (out_dir / "metrics.jsonl").read_text().splitlines() if '"tokens_per_s"' in line
    ]
    result["train_tokens_per_s"] = statistics.median(throughput[1:] or throughput)
    return result


def ablate(cfg: AblateConfig) -> Path:
    """Train and measure every (variant, seed) in sequence; write results.json, ABLATION.md and ablation.png."""
    variants = [name.strip() for name in cfg.variants.split(",") if name.strip()]
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(cfg)
    steps = plan_steps(cfg)
    results_file = out_dir / "results.json"
    results: dict[str, dict] = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for seed in range(1, cfg.seeds + 1):  # seed-major: a partial ablation has every variant at seed 1 first
        for variant in variants:
            key = f"{variant}-s{seed}"
            train_cfg = variant_train_config(cfg, variant, seed, steps)
            row = results.get(key, {})
            finished = _finished(train_cfg)
            if finished and row.get("eval_windows") == cfg.eval_windows:
                continue  # trained and measured: nothing to do
            print(f"ablate: {key} ({train_cfg.model.variant_summary()}), {steps} steps", flush=True)
            if not finished:
                row.update(run_training(train_cfg, data_dir))  # a finished run is only re-measured (its peak memory kept)
            measured = measure_run(train_cfg, cfg.eval_windows)
            results[key] = row | {"variant": variant, "seed": seed, "steps": steps, "eval_windows": cfg.eval_windows, **measured}
            tmp = results_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=2, sort_keys=True))
            tmp.replace(results_file)
            print(
                f"ablate: {key}: valid ppl {measured['ppl_1x']:.2f} (2x {measured['ppl_2x']:.2f}, 4x {measured['ppl_4x']:.2f})", flush=True
            )
    table = summary_table(results, variants, steps, TrainConfig.from_preset(cfg.base))
    (out_dir / "ABLATION.md").write_text(table)
    plot(results, variants, out_dir / "ablation.png")
    print(table)
    return out_dir


def mean_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for one value)."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, float(stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def paired_difference(
    results: dict[str, dict], variant: str, key: str = "ppl_1x", reference: str = "baseline"
) -> tuple[float, float, int] | None:
    """variant - reference over the seeds both ran, with the 95% t-interval of the mean difference, and n.

    A seed fixes the data order and the initialisation's random stream for every variant (the evaluation windows
    are the same for every run), so the seed-to-seed variation they share cancels in the per-seed difference: this interval is the one that says whether a variant differs from
    the reference, and it is narrower than the two variants' own intervals suggest."""
    by_seed = {r["seed"]: r[key] for r in results.values() if r["variant"] == reference}
    differences = [r[key] - by_seed[r["seed"]] for r in results.values() if r["variant"] == variant and r["seed"] in by_seed]
    if not differences:
        return None
    mean, half = mean_interval(differences)
    return mean, half, len(differences)


def summary_table(results: dict[str, dict], variants: list[str], steps: int, base: TrainConfig) -> str:
    tokens = steps * base.train.batch_size * base.data.seq_len
    lines = [
        f"{steps} steps x {base.train.batch_size} x {base.data.seq_len} tokens = {tokens / 1e6:.2f}M training tokens per run; "
        "valid perplexity: mean ± 95% t-interval over seeds (n = seeds), each seed's value in brackets; "
        "Δ baseline: the paired difference from the baseline on the same seeds, mean ± 95% t-interval (an interval "
        "that excludes 0 is a difference beyond the seed-to-seed noise)",
        "",
        "| variant | n | valid ppl | Δ baseline | ppl @2x ctx | ppl @4x ctx | params | active | train tok/s | peak MiB | decode tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in variants:
        rows = [r for r in results.values() if r["variant"] == variant]
        if not rows:
            continue

        def cell(key: str, fmt: str = ".2f", rows=rows) -> str:
            values = [r[key] for r in rows if r.get(key) is not None]
            if not values:
                return "-"
            mean, half = mean_interval(values)
            if len(values) > 1 and key.startswith("ppl"):
                return f"{mean:{fmt}} ± {half:{fmt}} ({', '.join(f'{v:{fmt}}' for v in values)})"
            return f"{mean:{fmt}}"

        paired = paired_difference(results, variant) if variant != "baseline" else None
        delta = "-" if paired is None else f"{paired[0]:+.2f}" + (f" ± {paired[1]:.2f}" if paired[2] > 1 else "")
        rows.sort(key=lambda r: r["seed"])
        first = rows[0]
        lines.append(
            f"| {variant} | {len(rows)} | {cell('ppl_1x')} | {delta} | {cell('ppl_2x')} | {cell('ppl_4x')} | {first['params'] / 1e6:.2f}M | "
            f"{first['active_params'] / 1e6:.2f}M | {cell('train_tokens_per_s', ',.0f')} | {cell('peak_memory_mib', ',.0f')} | "
            f"{cell('decode_tokens_per_s', ',.0f')} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], variants: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [v for v in variants if any(r["variant"] == v for r in results.values())]
    if not shown:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    # left: each variant's paired difference from the baseline (seed by seed): its mean and 95% t-interval
    others = [v for v in shown if v != "baseline"]
    for offset, (factor, marker) in zip((-0.2, 0.0, 0.2), ((1, "o"), (2, "s"), (4, "^"))):
        key = f"ppl_{factor}x"
        for i, variant in enumerate(others):
            paired = paired_difference(results, variant, key)
            if paired is None:
                continue
            mean, half, _ = paired
            axes[0].errorbar(
                i + offset,
                mean,
                yerr=half,
                fmt=marker,
                color=f"C{factor // 2}",
                capsize=3,
                label=f"{factor}x training context" if i == 0 else None,
            )
        if factor == 1:
            speed = [statistics.fmean(r["train_tokens_per_s"] for r in results.values() if r["variant"] == v) for v in shown]
            means = [statistics.fmean(r[key] for r in results.values() if r["variant"] == v) for v in shown]
            axes[1].scatter(speed, means)
            for name, x, y in zip(shown, speed, means):
                axes[1].annotate(name, (x, y))
    axes[0].axhline(0, color="grey", linewidth=0.8)
    axes[0].set_xticks(range(len(others)), others, rotation=30)
    axes[0].set_ylabel("valid perplexity - baseline's (paired by seed, 95%)")
    axes[0].set_ylim(-40, 60)
    axes[0].legend()
    axes[1].set_xlabel("training tokens/s")
    axes[1].set_ylabel("valid perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
