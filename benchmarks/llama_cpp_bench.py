"""x_llama against llama.cpp on the same trained model: `x-llama export --format gguf` in f32, f16 and q8_0, read by
llama.cpp through llama-cpp-python, in one process (each side timed on its own: see `main`).

Prints cached greedy decoding speed at batch 1: ours in float32 eager (as `x-llama generate` runs by default), with
each step one compiled graph (`--compile true`) in float32 and in bfloat16, and llama.cpp in each type (tokens per
second and llama.cpp / ours); and the validation perplexity of each export against ours on the same windows (what
quantisation costs).

    python benchmarks/llama_cpp_bench.py --run runs/x_llama/cpu     # ~3 minutes on 2 threads
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from common import interleaved
from x_llama.config import DataConfig
from x_llama.data import batch_at, step_seed, token_stream
from x_llama.export import export_gguf, llama_cpp_has_amx, open_in_llama_cpp
from x_llama.generation import generate
from x_llama.train import load_pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/x_llama/cpu", help="a trained x-llama run directory")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--windows", type=int, default=20, help="valid windows of seq_len tokens for perplexity")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import llama_cpp

    from axon_shared.checkpoint import load_checkpoint, run_checkpoints

    torch.set_num_threads(args.threads)
    model, tokenizer, config = load_pretrained(args.run)
    run_dir, (path,) = run_checkpoints(args.run)
    data = DataConfig.from_saved(load_checkpoint(path).config["data"])
    prompt = tokenizer.encode("And the LORD said unto Moses,", bos=True)
    new = min(args.new_tokens, config.max_seq_len - len(prompt))

    stream = token_stream(data, tokenizer, "valid", run_dir)
    windows = [batch_at(stream, 1, data.seq_len, step_seed(0, 0, i, 999)) for i in range(args.windows)]

    def perplexity(logits_of) -> float:
        losses = [float(F.cross_entropy(logits_of(inputs[0].tolist()).double(), targets[0])) for inputs, targets in windows]
        return math.exp(sum(losses) / len(losses))

    with torch.no_grad():
        ours_ppl = perplexity(lambda ids: model(torch.tensor([ids]))[0])

    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)

    def ours_decode(compile: bool = False, model=model):
        with torch.inference_mode():
            generate(model, [prompt], new, temperature=0.0, compile=compile)

    # timed apart, not interleaved: llama.cpp's worker threads keep spinning for a while after each call and slowed
    # our next call by up to 5x when the two alternated (the warm-up calls compile the step)
    ours_s, compiled_s, bf16_s = interleaved(
        [ours_decode, lambda: ours_decode(compile=True), lambda: ours_decode(compile=True, model=model_bf16)], args.repeats
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("f32", "f16", "q8_0"):
            file = export_gguf(model, tokenizer, Path(tmp) / f"model-{dtype}.gguf", dtype)
            llm = open_in_llama_cpp(file, config.max_seq_len, n_threads=args.threads, logits_all=True, verbose=False, seed=0)

            def logits_of(ids, llm=llm):
                llm.reset()
                llm.eval(ids)
                return torch.tensor(llm.scores[: len(ids)])

            def cpp_decode(llm=llm):
                for count, _ in enumerate(llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0), 1):
                    if count == new:
                        break

            ppl = perplexity(logits_of)
            (cpp_s,) = interleaved([cpp_decode], args.repeats)
            rows.append((dtype, file.stat().st_size / 2**20, ppl, new / cpp_s))
            llm.close()

    print(f"{args.run}: {model.num_parameters() / 1e6:.2f}M parameters, batch 1, {new} greedy tokens, {args.threads} threads")
    print(
        f"llama.cpp: {llama_cpp.llama_print_system_info().decode().strip()}; repacking {'off (AMX build)' if llama_cpp_has_amx() else 'on'}"
    )
    print(f"ours (float32 eager): valid perplexity {ours_ppl:.3f} on {args.windows} windows of {data.seq_len} tokens")
    eager, compiled, bf16 = new / ours_s, new / compiled_s, new / bf16_s
    print(f"ours, tokens/s: fp32 eager {eager:.0f}, fp32 compiled {compiled:.0f} ({compiled / eager:.2f}x), bf16 compiled {bf16:.0f}")
    print(
        "| llama.cpp type | file MiB | valid ppl | ppl / ours | llama.cpp tok/s | / ours fp32 eager | / ours fp32 compiled | / ours bf16 compiled |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for dtype, mib, ppl, cpp_tps in rows:
        ratios = " | ".join(f"{cpp_tps / ours:.2f}x" for ours in (eager, compiled, bf16))
        print(f"| {dtype} | {mib:.1f} | {ppl:.3f} | {ppl / ours_ppl:.4f} | {cpp_tps:.0f} | {ratios} |")


if __name__ == "__main__":
    main()
