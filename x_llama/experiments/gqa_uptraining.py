"""GQA uptraining at CPU scale: the three findings of Ainslie et al. 2023 (section 3.3), measured on en-text.

From one multi-head (MHA) `cpu`-preset run (8 kv heads, 2,400 steps) this script uptrains, with `x-llama uptrain`:

  * GQA-2 (2 kv heads) and MQA (1 kv head), each initialised by mean pooling, the group's first head, and random
    new heads (paper Figure 4: mean pooling is best), and the MHA model itself continued on the same schedule
    (the control: how much of the gain is just more training);
  * each for alpha = 0.1 of the original steps at a constant learning rate, so its evaluations every 0.0125 are
    alpha = 0, 0.0125, ..., 0.1 of the same run (paper Figure 5: quality against the uptraining proportion);
  * with two data-order seeds (the random heads differ with the seed too).

Then it evaluates every final model and the MHA source on the same fixed windows of the valid split, measures
cached greedy decoding speed and KV-cache memory for MHA, GQA-2 and MQA (paper Figure 3: quality against
inference time), and writes results.json, a markdown table and x_llama/docs/gqa_uptraining.png.

    x-llama train --preset cpu --model.n_kv_heads null --data.tokenizer runs/x_llama/cpu/tokenizer.model \\
        --train.out_dir runs/x_llama/cpu_mha
    python x_llama/experiments/gqa_uptraining.py --source runs/x_llama/cpu_mha --scratch runs/x_llama/cpu

Every run resumes: rerunning the script trains only what is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from axon_shared.checkpoint import load_checkpoint, run_checkpoints
from x_llama.config import DataConfig, LlamaConfig
from x_llama.data import token_stream
from x_llama.generation import generate
from x_llama.gqa import convert_kv_heads
from x_llama.train import evaluate_loss, load_pretrained

METHODS = ("mean", "first", "random")


def label(kv: int, mha: int) -> str:
    return "MHA" if kv == mha else "MQA" if kv == 1 else f"GQA-{kv}"


def run_name(kv: int, mha: int, method: str, seed: int) -> str:
    return f"{label(kv, mha).lower()}-{method}-seed{seed}"


def planned_runs(kv_heads: list[int], mha: int, seeds: list[int]) -> list[tuple[int, str, int]]:
    runs = [(kv, method, seed) for kv in kv_heads for method in METHODS for seed in seeds]
    return runs + [(mha, "mean", seed) for seed in seeds]  # MHA "converted" to all its heads is the model itself: the control


def train_runs(args, runs, mha: int) -> None:
    for kv, method, seed in runs:
        out = args.out / run_name(kv, mha, method, seed)
        command = [sys.executable, "-m", "x_llama.cli", "uptrain", "--from_run", str(args.source), "--n_kv_heads", str(kv)]
        command += ["--method", method, "--seed", str(seed), "--fraction", str(args.fraction), "--out_dir", str(out)]
        command += ["--eval_every", str(args.eval_every), "--eval_batches", str(args.eval_batches)]
        started = time.monotonic()
        print(f"== {out.name}", flush=True)
        subprocess.run(command, check=True)
        print(f"   {time.monotonic() - started:.0f} s", flush=True)


def curve(run_dir: Path, source_steps: int) -> list[tuple[float, float]]:
    """(alpha, valid loss) from the run's in-training evaluations (alpha = step / the source run's steps)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"] / source_steps, r["valid/loss"]) for r in records if "valid/loss" in r]


@torch.inference_mode()
def decode_speed(model, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3) -> float:
    """Median milliseconds per decoding step (one new token for every row) of cached greedy decoding."""
    prompts = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).tolist()
    generate(model, prompts, 8)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate(model, prompts, new_tokens)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / new_tokens


def measure(args, runs, mha: int) -> dict:
    run_dir, (source_path,) = run_checkpoints(args.source)
    source_ckpt = load_checkpoint(source_path)
    source_steps = source_ckpt.step
    data = DataConfig.from_saved(source_ckpt.config["data"])
    batch_size = source_ckpt.config["train"]["batch_size"]
    source_model, tokenizer, _ = load_pretrained(args.source)
    stream = token_stream(data, tokenizer, "valid", run_dir)
    # the windows the uptraining runs evaluate on (train.evaluate_loss with seed 0 and the source run's batch size)
    results = {
        "source": str(args.source),
        "source_steps": source_steps,
        "mha_kv_heads": mha,
        "eval_tokens": args.eval_batches * batch_size * data.seq_len,
    }
    results["mha_source_loss"] = evaluate_loss(source_model, stream, args.eval_batches, batch_size, data.seq_len, seed=0)
    if args.scratch:
        scratch, _, _ = load_pretrained(args.scratch)
        results["scratch"] = {
            "run": str(args.scratch),
            "loss": evaluate_loss(scratch, stream, args.eval_batches, batch_size, data.seq_len, seed=0),
        }
    results["runs"] = {}
    for kv, method, seed in runs:
        out = args.out / run_name(kv, mha, method, seed)
        results["runs"][out.name] = {"kv_heads": kv, "method": method, "seed": seed, "curve": curve(out, source_steps)}
        print(f"{out.name}: valid loss {results['runs'][out.name]['curve'][-1][1]:.4f}", flush=True)
    # decoding: speed depends on the shapes only, so the converted (not uptrained) models stand for the runs
    models = {kv: convert_kv_heads(source_model, kv) for kv in (mha, *args.kv_heads)}
    results["decode"] = []
    for batch in args.decode_batches:
        for kv, model in models.items():
            cache = model.new_cache(batch)
            results["decode"].append(
                {
                    "kv_heads": kv,
                    "batch": batch,
                    "ms_per_step": decode_speed(model, batch, args.prompt_len, data.seq_len - args.prompt_len),
                    "kv_cache_mib": cache.nbytes / 2**20,
                }
            )
            print(f"decode {label(kv, mha)} batch {batch}: {results['decode'][-1]['ms_per_step']:.2f} ms/step", flush=True)
    return results


def summary(results: dict, fraction: float) -> str:
    """Markdown: valid perplexity (mean over seeds, and each seed) by kv heads and initialisation at alpha and alpha/2."""
    lines = [
        "| model | init | " + " | ".join(f"ppl at alpha={a:g}" for a in (0, fraction / 2, fraction)) + " |",
        "|---|---|---:|---:|---:|",
    ]
    runs, mha = results["runs"], results["mha_kv_heads"]
    kv_heads = sorted({r["kv_heads"] for r in runs.values()}, reverse=True)
    for kv in kv_heads:
        for method in METHODS if kv != mha else ("(continued)",):
            chosen = [r for r in runs.values() if r["kv_heads"] == kv and (kv == mha or r["method"] == method)]
            if not chosen:
                continue
            cells = []
            for alpha in (0, fraction / 2, fraction):
                losses = [min(r["curve"], key=lambda point: abs(point[0] - alpha))[1] for r in chosen]
                per_seed = " / ".join(f"{math.exp(v):.1f}" for v in losses)
                cells.append(f"{math.exp(statistics.mean(losses)):.2f} ({per_seed})")
            lines.append(f"| {label(kv, mha)} | {method} | " + " | ".join(cells) + " |")
    lines.append(f"\nMHA source (alpha = 0): {math.exp(results['mha_source_loss']):.2f}")
    if "scratch" in results:
        lines.append(f"from scratch ({results['scratch']['run']}): {math.exp(results['scratch']['loss']):.2f}")
    lines += ["", "| model | batch | ms / decoding step | KV cache (MiB, fp32, full context) |", "|---|---:|---:|---:|"]
    for row in results["decode"]:
        lines.append(f"| {label(row['kv_heads'], mha)} | {row['batch']} | {row['ms_per_step']:.2f} | {row['kv_cache_mib']:.1f} |")
    return "\n".join(lines)


def plot(results: dict, fraction: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, mha = results["runs"], results["mha_kv_heads"]
    kv_heads = sorted({r["kv_heads"] for r in runs.values()}, reverse=True)
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = dict(zip(kv_heads, ["black", "tab:blue", "tab:red", "tab:green", "tab:purple"]))
    styles = {"mean": "-", "first": "--", "random": ":"}
    for kv in kv_heads:
        for method in METHODS:
            chosen = [r for r in runs.values() if r["kv_heads"] == kv and r["method"] == method]
            if not chosen:
                continue
            alphas = [a for a, _ in chosen[0]["curve"]]
            ppl = [math.exp(statistics.mean(r["curve"][i][1] for r in chosen)) for i in range(len(alphas))]
            name = f"{label(kv, mha)} ({'continued' if kv == mha else method})"
            left.plot(alphas, ppl, styles[method], color=colours[kv], label=name, marker="o", ms=3)
            if method == "mean":
                middle.plot(alphas, ppl, "-", color=colours[kv], label=name, marker="o", ms=3)
    left.set(xlabel="uptraining proportion alpha", ylabel="valid perplexity", title="initialisation (cf. paper Figure 4)", yscale="log")
    middle.set(xlabel="uptraining proportion alpha", ylabel="valid perplexity", title="mean pooling (cf. paper Figure 5)")
    left.legend(fontsize=7)
    middle.legend(fontsize=8)
    for kv in kv_heads:
        chosen = [r["curve"][-1][1] for r in runs.values() if r["kv_heads"] == kv and r["method"] == "mean"]
        speed = [
            row["ms_per_step"]
            for row in results["decode"]
            if row["kv_heads"] == kv and row["batch"] == max(r["batch"] for r in results["decode"])
        ]
        if chosen and speed:
            right.scatter(speed, [math.exp(statistics.mean(chosen))], color=colours[kv], label=label(kv, mha))
    batch = max(r["batch"] for r in results["decode"])
    right.set(xlabel=f"ms per decoding step (batch {batch}, cached greedy)", ylabel=f"valid perplexity (alpha = {fraction:g})")
    right.set_title("quality against decoding time (cf. paper Figure 3)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=Path("runs/x_llama/cpu_mha"), help="the MHA pretraining run")
    parser.add_argument("--scratch", type=Path, default=None, help="a GQA run trained from scratch, for comparison")
    parser.add_argument("--out", type=Path, default=Path("runs/x_llama/gqa_uptraining"))
    parser.add_argument("--kv_heads", type=int, nargs="+", default=[2, 1], help="the grouped models (MHA is the source's head count)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--eval_every", type=int, default=30)
    parser.add_argument("--eval_batches", type=int, default=20)
    parser.add_argument("--decode_batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--plot", type=Path, default=Path("x_llama/docs/gqa_uptraining.png"))
    args = parser.parse_args()
    mha = load_checkpoint(run_checkpoints(args.source)[1][0]).model_config(LlamaConfig).kv_heads
    runs = planned_runs(args.kv_heads, mha, args.seeds)
    train_runs(args, runs, mha)
    results = measure(args, runs, mha)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = summary(results, args.fraction)
    (args.out / "results.md").write_text(table + "\n")
    print(table)
    plot(results, args.fraction, args.plot)


if __name__ == "__main__":
    main()
