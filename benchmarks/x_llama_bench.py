"""x_llama vs transformers.LlamaForCausalLM: same config, same weights, same process, repetitions interleaved.

Training step (forward + backward + AdamW) in three precision modes, each side in the same one: fp32 eager,
bf16 autocast eager, bf16 autocast + torch.compile (ours fullgraph, the model and the loss in one graph, as
`train.compile` does; theirs the same loss function compiled). MFU against the fp32 and the bf16 matmul peaks
measured in this run. Then prefill latency, cached greedy decode at batch 1 and 8 (theirs with its own dynamic
and static KV caches; then ours with the compiled step, `generate(compile=True)`, against their static cache
compiled with the same inductor options), our cache against re-running the prefix, GQA/MHA/MQA cache memory and
decode speed.
`--scaling`: training tokens/s and MFU at 1x, 4x and 16x the `cpu` preset's parameters, decode ms/token at
context 128, 512 and 2048, peak memory against batch size; a table and a plot.

    python benchmarks/x_llama_bench.py            # ~6 minutes on 2 threads
    python benchmarks/x_llama_bench.py --quick    # smoke run
    python benchmarks/x_llama_bench.py --scaling  # how cost grows (~8 minutes)
    python benchmarks/x_llama_bench.py --decode   # only the decode table, eager and compiled (~3 minutes)
    python benchmarks/x_llama_bench.py --compare runs/x_llama/mha runs/x_llama/gqa   # trained runs side by side
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers
from transformers import CompileConfig

from common import BF16, MODES, interleaved, peaks, precision
from x_llama import Llama, LlamaConfig, generate, lm_loss
from x_llama.hf import to_hf
from x_llama.model import decode_compile_options, decode_mm_limits, mm_pass_limits
from x_llama.train import training_flops_per_token

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()


def timed(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` runs (after one warm-up); repeats=0: a single cold run."""
    if repeats == 0:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_fn(model, tokens, hf: bool, mode: str):
    """One optimizer step in `mode`: the loss under bf16 autocast or not, compiled (with the model call) or not."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss_of(inputs, targets):
        logits = model(inputs, use_cache=False).logits if hf else model(inputs)
        return lm_loss(logits, targets)

    # ours must capture one graph (the engine's train.compile); transformers' model may break its graph
    loss_fn = torch.compile(loss_of, fullgraph=not hf) if "compiled" in mode else loss_of

    def step():
        with precision(mode):
            loss = loss_fn(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def training_rows(config: LlamaConfig, batch: int, seq: int, repeats: int, peaks: dict, modes=MODES, hf: bool = True) -> list[dict]:
    """Training tokens/s of ours (and transformers') in each mode, same initial weights."""
    rows = []
    tokens = torch.randint(3, config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    flops = training_flops_per_token(config, seq) * batch * seq
    for mode in modes:
        torch.manual_seed(0)
        ours = Llama(config).train()
        fns = [train_step_fn(ours, tokens, False, mode)]
        if hf:
            theirs = to_hf(ours, attn_implementation="sdpa").train()
            fns.append(train_step_fn(theirs, tokens, True, mode))
        seconds = interleaved(fns, repeats)
        peak = peaks["bf16" if "bf16" in mode else "fp32"]  # MFU of the mode's own peak
        row = {
            "mode": mode,
            "ours": batch * seq / seconds[0],
            "mfu": flops / seconds[0] / peak,
            "mfu_fp32": flops / seconds[0] / peaks["fp32"],
        }
        if hf:
            row |= {"theirs": batch * seq / seconds[1], "theirs_mfu": flops / seconds[1] / peak, "ratio": seconds[1] / seconds[0]}
        rows.append(row)
        torch._dynamo.reset()
    return rows


def hf_decode(model, prompts: torch.Tensor, new: int, cache_implementation: str | None, compile: bool = False):
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if cache_implementation:
        kwargs["cache_implementation"] = cache_implementation
    if compile:  # generate compiles the decoding forward with a static cache; on CPU only when told to
        config = CompileConfig(fullgraph=True, dynamic=False, mode=None, options=decode_compile_options(len(prompts)))
        config._compile_all_devices = True
        kwargs["compile_config"] = config

    def run():
        with mm_pass_limits(decode_mm_limits(len(prompts))) if compile else contextlib.nullcontext():  # our step's limits
            return model.generate(prompts, attention_mask=torch.ones_like(prompts), **kwargs)

    return run


def decode_rows(ours: Llama, theirs, tokens: torch.Tensor, new: int, batches: tuple[int, ...], repeats: int) -> list[dict]:
    """Cached greedy decode tokens/s after a 64-token prompt: ours eager and compiled (`generate(compile=True)`)
    against transformers' dynamic and static caches, and its static cache compiled with the same inductor options."""
    rows = []
    for batch in batches:
        prompts = tokens[:batch, :64]
        fns = [
            lambda prompts=prompts: generate(ours, prompts.tolist(), new),
            lambda prompts=prompts: generate(ours, prompts.tolist(), new, compile=True),
            hf_decode(theirs, prompts, new, None),
            hf_decode(theirs, prompts, new, "static"),
            hf_decode(theirs, prompts, new, "static", compile=True),
        ]
        seconds = interleaved(fns, repeats, warmup=1)
        speed = [batch * new / s for s in seconds]
        rows.append(
            {
                "batch": batch,
                **dict(zip(["ours", "ours_compiled", "dynamic", "static", "static_compiled"], speed)),
                "ratio": min(seconds[2:4]) / seconds[0],
                "ratio_compiled": seconds[4] / seconds[1],
            }
        )
    return rows


def compare_runs(run_dirs: list[str]) -> None:
    """Trained runs side by side (e.g. MHA vs GQA at equal training FLOPs): validation perplexity, training
    FLOPs and wall time, KV-cache memory, and cached decode speed of the trained weights."""
    import json
    from pathlib import Path

    from x_llama import load_pretrained
    from x_llama.config import TrainConfig

    print(
        f"{'run':<22}{'kv heads':>9}{'params':>10}{'steps':>7}{'train PFLOP':>12}{'minutes':>9}{'val ppl':>9}"
        f"{'KV MiB (B=8, T=256)':>21}{'decode tok/s (B=8)':>20}"
    )
    for run in run_dirs:
        run = Path(run)
        cfg = TrainConfig.from_saved(json.loads((run / "config.json").read_text()))
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in rows if "train/loss" in r][-1]
        ppl = [r for r in rows if "valid/ppl" in r][-1]["valid/ppl"]
        flops = last["tokens"] * training_flops_per_token(cfg.model, cfg.data.seq_len)
        model, tokenizer, config = load_pretrained(run)
        prompts = [
            tokenizer.encode(p, bos=True)
            for p in ("In the beginning", "And the LORD said", "To be", "She was", "The king", "My lord", "It is", "And it came to pass")
        ]
        new = min(128, config.max_seq_len - max(len(p) for p in prompts))
        generate(model, prompts, 8)
        start = time.perf_counter()
        generate(model, prompts, new)
        speed = len(prompts) * new / (time.perf_counter() - start)
        cache_mib = model.new_cache(8, min(256, config.max_seq_len)).nbytes * 256 / min(256, config.max_seq_len) / 2**20
        print(
            f"{run.name:<22}{config.kv_heads:>9}{config.num_parameters() / 1e6:>9.2f}M{last['step']:>7}{flops / 1e15:>12.3f}"
            f"{last['time'] / 60:>9.1f}{ppl:>9.2f}{cache_mib:>21.2f}{speed:>20.1f}"
        )


def plot_scaling(result: dict, path: Path) -> None:
    """The three panels of --scaling: MFU against parameters, decode ms/token against context, memory against batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    mode = result["training"][0]["mode"]
    axes[0].plot([r["params"] / 1e6 for r in result["training"]], [r["mfu"] for r in result["training"]], "o-")
    axes[0].set(xscale="log", xlabel="parameters (M)", ylabel=f"MFU vs {mode.split()[0]} peak", title=f"training, {mode}")
    sizes = [r["params"] / 1e6 for r in result["training"]]
    axes[0].set_xticks(sizes, [f"{m:.1f}" for m in sizes])
    axes[0].minorticks_off()
    axes[1].plot([r["context"] for r in result["decode"]], [r["ms_per_token"] for r in result["decode"]], "o-")
    axes[1].set(xscale="log", xlabel="context (tokens)", ylabel="ms / token", title="cached decode, batch 1")
    contexts = [r["context"] for r in result["decode"]]
    axes[1].set_xticks(contexts, [str(c) for c in contexts])
    axes[1].minorticks_off()
    axes[2].plot([r["batch"] for r in result["memory"]], [r["peak_mib"] for r in result["memory"]], "o-")
    axes[2].set(xlabel="batch size (x 256 tokens)", ylabel="peak RSS (MiB)", title=f"training memory, {'bf16' if BF16 else 'fp32'}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def scaling(quick: bool, peaks: dict, out_dir: Path) -> None:
    """How cost grows: training (bf16 compiled; fp32 where bf16 is emulated) at 1x, 4x, 16x the cpu preset's parameters; decode ms/token at
    context 128, 512, 2048; peak resident memory of a training step against batch size (one process each)."""
    base = LlamaConfig.from_preset("cpu")
    sizes = {"1x": base, "4x": base.replace(dim=512, n_layers=8), "16x": base.replace(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4)}
    if quick:
        sizes = {"1x": base.replace(n_layers=2)}
    print(f"\ntraining, {MODES[-1]}, batch 8 x 256 (ours only)\n{'size':<6}{'params':>10}{'tokens/s':>11}{'MFU':>10}{'MFU fp32':>10}")
    result = {"training": [], "decode": [], "memory": []}
    for name, config in sizes.items():
        row = training_rows(config, 8, 256, 2 if quick else 3, peaks, modes=(MODES[-1],), hf=False)[0]
        row |= {"size": name, "params": config.num_parameters()}
        result["training"].append(row)
        print(f"{name:<6}{config.num_parameters() / 1e6:>9.1f}M{row['ours']:>11,.0f}{row['mfu']:>10.1%}{row['mfu_fp32']:>10.1%}")

    print(f"\ncached greedy decode, batch 1, fp32 (cpu preset)\n{'context':<9}{'ms/token':>10}")
    config = base.replace(max_seq_len=2048 + 64)
    torch.manual_seed(0)
    model = Llama(config).eval()
    new = 32
    for context in (128, 512) if quick else (128, 512, 2048):
        prompt = torch.randint(3, config.vocab_size, (context,), generator=torch.Generator().manual_seed(1)).tolist()
        # decode time = total - prefill time, measured separately
        total = timed(lambda prompt=prompt: generate(model, [prompt], new), 1)
        prefill = timed(lambda prompt=prompt: generate(model, [prompt], 1), 1)
        ms = 1e3 * (total - prefill) / (new - 1)
        result["decode"].append({"context": context, "ms_per_token": ms})
        print(f"{context:<9}{ms:>10.2f}")

    print(
        f"\npeak resident memory of training steps ({'bf16' if BF16 else 'fp32'} eager, cpu preset, seq 256)\n{'batch':<7}{'peak MiB':>10}"
    )
    for batch in (1, 4) if quick else (1, 4, 16, 32):
        code = (
            "import torch; from x_llama import Llama, LlamaConfig, lm_loss; torch.set_num_threads(1);"
            f"m = Llama(LlamaConfig.from_preset('cpu')).train(); t = torch.randint(3, 4096, ({batch}, 257));"
            "opt = torch.optim.AdamW(m.parameters());"
            f"exec('for _ in range(2):\\n with torch.autocast(\\'cpu\\', dtype=torch.bfloat16, enabled={BF16}): l = lm_loss(m(t[:, :-1]), t[:, 1:])\\n l.backward(); opt.step(); opt.zero_grad()');"
            # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec
            "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')][0])"
        )
        peak_kib = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])
        result["memory"].append({"batch": batch, "peak_mib": peak_kib / 1024})
        print(f"{batch:<7}{peak_kib / 1024:>10.0f}")

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "x_llama_scaling.json").write_text(json.dumps(result, indent=1))
    plot_scaling(result, out_dir / "x_llama_scaling.png")
    print(f"\nwrote {out_dir / 'x_llama_scaling.png'} and .json")


def decode_tokens(config: LlamaConfig) -> torch.Tensor:
    return torch.randint(3, config.vocab_size, (8, 257), generator=torch.Generator().manual_seed(0))


def decode_table(ours: Llama, theirs, tokens: torch.Tensor, quick: bool, repeats: int) -> None:
    new = 32 if quick else 128
    print(
        f"\ncached greedy decode, fp32, {new} new tokens after 64 (tokens/s); eager: ours / transformers' faster cache, "
        "compiled: ours / transformers' static cache compiled"
    )
    print(
        f"{'batch':<7}{'x_llama':>10}{'HF dynamic':>12}{'HF static':>11}{'ratio':>8}{'x_llama comp.':>15}{'HF static comp.':>17}{'ratio':>8}"
    )
    for row in decode_rows(ours, theirs, tokens, new, (1, 8), max(1, repeats - 2)):
        print(
            f"{row['batch']:<7}{row['ours']:>10,.0f}{row['dynamic']:>12,.0f}{row['static']:>11,.0f}{row['ratio']:>7.2f}x"
            f"{row['ours_compiled']:>15,.0f}{row['static_compiled']:>17,.0f}{row['ratio_compiled']:>7.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke run)")
    parser.add_argument("--scaling", action="store_true", help="how cost grows with parameters, context and batch")
    parser.add_argument("--out_dir", default="runs/benchmarks", help="where --scaling writes its plot and table")
    parser.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="compare trained run directories instead")
    parser.add_argument("--decode", action="store_true", help="only the cached-decode table (eager and compiled)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("AXON_THREADS", torch.get_num_threads())))
    if args.compare:
        compare_runs(args.compare)
        return
    quick = args.quick
    repeats = 2 if quick else 5
    config = LlamaConfig.from_preset("cpu", max_seq_len=1024)  # dim 256, 6 layers, 8 query / 2 kv heads
    if quick:
        config = config.replace(n_layers=2)
    print(
        f"x_llama benchmark: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} thread(s); model {config.num_parameters() / 1e6:.2f}M params "
        f"(dim {config.dim}, {config.n_layers} layers, {config.n_heads}/{config.kv_heads} q/kv heads, vocab {config.vocab_size})"
    )
    size = 512 if quick else 1024
    machine = peaks(size)
    print(f"measured matmul peak: fp32 {machine['fp32'] / 1e9:.0f} GFLOP/s, bf16 {machine['bf16'] / 1e9:.0f} GFLOP/s")  # nan: emulated
    if args.scaling:
        scaling(quick, machine, Path(args.out_dir))
        return

    if args.decode:
        torch.manual_seed(0)
        ours = Llama(config).eval()
        decode_table(ours, to_hf(ours, attn_implementation="sdpa").eval(), decode_tokens(config), quick, repeats)
        return

    batch, seq = (4, 128) if quick else (8, 256)
    print(f"\ntraining step, batch {batch} x {seq} tokens (tokens/s; ratio = ours / theirs, > 1: x_llama faster)")
    print(f"{'mode':<15}{'x_llama':>10}{'transformers':>14}{'ratio':>8}{'MFU (of the mode peak)':>24}{'theirs MFU':>12}")
    for row in training_rows(config, batch, seq, repeats, machine):
        print(
            f"{row['mode']:<15}{row['ours']:>10,.0f}{row['theirs']:>14,.0f}{row['ratio']:>7.2f}x{row['mfu']:>24.1%}{row['theirs_mfu']:>12.1%}"
        )

    torch.manual_seed(0)
    ours = Llama(config).eval()
    theirs = to_hf(ours, attn_implementation="sdpa").eval()
    tokens = decode_tokens(config)
    prompt_len = 64 if quick else 256
    prompt = tokens[:1, :prompt_len]
    with torch.no_grad():
        ours_prefill, theirs_prefill = interleaved(
            [
                lambda: ours(prompt, cache=ours.new_cache(1, prompt_len), last_only=True),
                lambda: theirs(prompt, use_cache=True, logits_to_keep=1),
            ],
            repeats,
        )
    print(
        f"\nprefill of {prompt_len} tokens, fp32: x_llama {1e3 * ours_prefill:.1f} ms, transformers {1e3 * theirs_prefill:.1f} ms -> {theirs_prefill / ours_prefill:.2f}x"
    )

    decode_table(ours, theirs, tokens, quick, repeats)

    # our KV cache against re-running the prefix
    length = 128 if quick else 512
    cached = timed(lambda: generate(ours, [[1]], length - 1, use_cache=True), 1)  # warm, like uncached's later steps
    uncached = timed(lambda: generate(ours, [[1]], length - 1, use_cache=False), 0)
    print(f"\nx_llama decode to {length} tokens: cached {cached:.2f} s, uncached {uncached:.2f} s -> speedup {uncached / cached:.1f}x")

    # GQA vs MHA vs MQA: cache memory and decode speed (batch 8, 192-token prompts)
    print(f"\n{'kv heads':<12}{'KV cache (MiB), B=8, 1024 ctx':>32}{'decode tokens/s (B=8)':>24}")
    decode_batch, decode_new = (2, 16) if quick else (8, 64)
    for kv in (config.n_heads, 2, 1):
        variant = Llama(config.replace(n_kv_heads=kv)).eval()
        cache_mib = variant.new_cache(8, 1024).nbytes / 2**20
        prompts = [tokens[i % 8, :192].tolist() for i in range(decode_batch)]
        seconds = timed(lambda variant=variant, prompts=prompts: generate(variant, prompts, decode_new), 1)
        label = {config.n_heads: "MHA", 1: "MQA"}.get(kv, "GQA")
        print(f"{f'{kv} ({label})':<12}{cache_mib:>32.1f}{decode_batch * decode_new / seconds:>24.1f}")


if __name__ == "__main__":
    main()
