"""x_llama vs transformers.LlamaForCausalLM: same config, same weights, same process.

Measures training-step tokens/s (forward + backward + AdamW), prefill latency, cached greedy decode tokens/s,
our cached-vs-uncached decode speedup at 512 tokens, MFU against a matmul peak measured in this run, and
GQA vs MHA vs MQA KV-cache memory and decode speed. Prints tables with ratios (ours / theirs; > 1 = we are faster).

    python benchmarks/x_llama_bench.py            # ~3 minutes on one CPU thread
    python benchmarks/x_llama_bench.py --quick    # smoke run
    python benchmarks/x_llama_bench.py --compare runs/x_llama/mha runs/x_llama/gqa   # trained runs side by side
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
import transformers

from x_llama import Llama, LlamaConfig, generate, lm_loss
from x_llama.hf import to_hf
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


def matmul_peak(size: int = 1024, repeats: int = 20) -> float:
    """Best measured fp32 matmul throughput (FLOP/s) on this machine, the MFU denominator: the fastest of
    `repeats` square matmuls (the machine is shared, so the best run is the closest to the hardware's peak)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def train_step_fn(model, tokens, hf: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        if hf:
            logits = model(tokens[:, :-1], use_cache=False).logits
        else:
            logits = model(tokens[:, :-1])
        loss = lm_loss(logits, tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke run)")
    parser.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="compare trained run directories instead")
    args = parser.parse_args()
    if os.environ.get("AXON_THREADS"):
        torch.set_num_threads(int(os.environ["AXON_THREADS"]))
    if args.compare:
        compare_runs(args.compare)
        return
    quick = args.quick
    repeats = 2 if quick else 5
    config = LlamaConfig.from_preset("cpu", max_seq_len=1024)  # dim 256, 6 layers, 8 query / 2 kv heads
    if quick:
        config = config.replace(n_layers=2)
    torch.manual_seed(0)
    ours = Llama(config)
    theirs = to_hf(ours, attn_implementation="sdpa").train()
    ours.train()
    batch, seq = (4, 128) if quick else (8, 256)
    tokens = torch.randint(3, config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))

    print(
        f"x_llama benchmark: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} thread(s); model {config.num_parameters() / 1e6:.2f}M params "
        f"(dim {config.dim}, {config.n_layers} layers, {config.n_heads}/{config.kv_heads} q/kv heads, vocab {config.vocab_size})"
    )
    peak = matmul_peak(512 if quick else 1024)
    print(f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    rows = []

    # training step (interleaved repetitions so both see the same machine load)
    ours_step, theirs_step = train_step_fn(ours, tokens, hf=False), train_step_fn(theirs, tokens, hf=True)
    ours_times, theirs_times = [], []
    ours_step(), theirs_step()
    for _ in range(repeats):
        for fn, bucket in ((ours_step, ours_times), (theirs_step, theirs_times)):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    tokens_per_step = batch * seq
    ours_tps, theirs_tps = tokens_per_step / statistics.median(ours_times), tokens_per_step / statistics.median(theirs_times)
    flops = training_flops_per_token(config, seq)
    rows.append(("training tokens/s", ours_tps, theirs_tps, ours_tps / theirs_tps))
    rows.append(("training MFU", ours_tps * flops / peak, theirs_tps * flops / peak, ours_tps / theirs_tps))

    # prefill latency: one 256-token (64 quick) prompt, no grad
    ours.eval(), theirs.eval()
    prompt_len = 64 if quick else 256
    prompt = tokens[:1, :prompt_len]
    with torch.no_grad():
        ours_prefill = timed(lambda: ours(prompt, cache=ours.new_cache(1, prompt_len), last_only=True), repeats)
        theirs_prefill = timed(lambda: theirs(prompt, use_cache=True, logits_to_keep=1), repeats)
    rows.append(("prefill latency (ms)", 1e3 * ours_prefill, 1e3 * theirs_prefill, theirs_prefill / ours_prefill))

    # cached greedy decode: 128 new tokens (32 quick) after a 64-token prompt, batch 1
    new = 32 if quick else 128
    short = tokens[0, :64].tolist()
    ours_decode = timed(lambda: generate(ours, [short], new), max(1, repeats - 2))
    theirs_decode = timed(
        lambda: theirs.generate(torch.tensor([short]), max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0),
        max(1, repeats - 2),
    )
    rows.append(("cached decode tokens/s", new / ours_decode, new / theirs_decode, theirs_decode / ours_decode))

    print()
    print(f"{'metric':<26}{'x_llama':>12}{'transformers':>14}{'ratio':>8}")
    for name, a, b, ratio in rows:
        fmt = (lambda v: f"{v:.1%}") if "MFU" in name else (lambda v: f"{v:,.1f}")
        print(f"{name:<26}{fmt(a):>12}{fmt(b):>14}{ratio:>7.2f}x")
    print("ratio = ours/theirs for throughput, theirs/ours for latency: > 1 means x_llama is faster")

    # our KV cache against re-running the prefix
    length = 128 if quick else 512
    start_prompt = [1]
    cached = timed(lambda: generate(ours, [start_prompt], length - 1, use_cache=True), 1)  # warm, like uncached's later steps
    uncached = timed(lambda: generate(ours, [start_prompt], length - 1, use_cache=False), 0)
    print(f"\nx_llama decode to {length} tokens: cached {cached:.2f} s, uncached {uncached:.2f} s -> speedup {uncached / cached:.1f}x")

    # GQA vs MHA vs MQA: cache memory and decode speed (batch 8, 256-token context)
    print(f"\n{'kv heads':<12}{'KV cache (MiB), B=8, 1024 ctx':>32}{'decode tokens/s (B=8)':>24}")
    decode_batch, decode_new = (2, 16) if quick else (8, 64)
    for kv in (config.n_heads, 2, 1):
        variant = Llama(config.replace(n_kv_heads=kv)).eval()
        cache_mib = variant.new_cache(8, 1024).nbytes / 2**20
        prompts = [tokens[i % batch, :192].tolist() for i in range(decode_batch)]
        seconds = timed(lambda variant=variant, prompts=prompts: generate(variant, prompts, decode_new), 1)
        label = {config.n_heads: "MHA", 1: "MQA"}.get(kv, "GQA")
        print(f"{f'{kv} ({label})':<12}{cache_mib:>32.1f}{decode_batch * decode_new / seconds:>24.1f}")


if __name__ == "__main__":
    main()
