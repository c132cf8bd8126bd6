"""The architecture lab's costs, measured alone: every `x-llama ablate` variant at the `cpu` preset's size (as the
ablation builds it), each in its own process so its peak memory is its own.

Per variant: training tokens/s (forward + backward + AdamW, batch 16 x 256, bf16 autocast eager: the ablation's
mode), the ratio to the baseline, parameters (total, active), cached greedy decode tokens/s at batch 1 (128 new
tokens after a 16-token prompt) and the process's peak resident memory. The ablation's own speed columns come
from its training logs, which share the machine with whatever else ran; this is the idle measurement.

    python benchmarks/variants_bench.py             # ~4 minutes on 2 threads
    python benchmarks/variants_bench.py --quick     # smoke run (2 variants, fewer steps)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from x_llama.ablate import VARIANTS, variant_train_config
from x_llama.config import AblateConfig
from x_llama.generation import generate
from x_llama.model import Llama, lm_loss


def measure(name: str, steps: int) -> dict[str, float]:
    """One variant in this process: training step time, decode speed, parameters, peak memory."""
    config = variant_train_config(AblateConfig(steps=1), name, 1, 1)
    torch.manual_seed(0)
    model = Llama(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch, length = config.train.batch_size, config.data.seq_len
    tokens = torch.randint(0, config.model.vocab_size, (batch, length + 1), generator=torch.Generator().manual_seed(0))
    times = []
    for step in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
            auxiliary = model.auxiliary_loss()
            if auxiliary is not None:
                loss = loss + auxiliary
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - start)
    model.eval()
    prompt = tokens[0, :16].tolist()
    generate(model, [prompt], 8)  # warm-up
    start = time.perf_counter()
    new = generate(model, [prompt], 128)[0]
    decode = len(new) / (time.perf_counter() - start)
    return {
        "train_tokens_per_s": batch * length / statistics.median(times),
        "decode_tokens_per_s": decode,
        "params": model.num_parameters(),
        "active_params": model.active_parameters(),
        "peak_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 variants, 2 timed steps")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one variant and print JSON
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps)))
        return
    names = ["baseline", "moe"] if args.quick else list(VARIANTS)
    steps = 2 if args.quick else args.steps
    print(f"{torch.get_num_threads()} thread(s); bf16 autocast eager; batch 16 x 256; {steps} timed steps per variant")
    print(f"{'variant':<10}{'params':>9}{'active':>9}{'train tok/s':>13}{'vs base':>9}{'decode tok/s':>14}{'peak MiB':>10}")
    baseline = None
    for name in names:
        output = subprocess.run(
            [sys.executable, __file__, "--one", name, "--steps", str(steps)], check=True, capture_output=True, text=True, env=os.environ
        ).stdout
        row = json.loads(output.strip().splitlines()[-1])
        baseline = baseline or row["train_tokens_per_s"]
        print(
            f"{name:<10}{row['params'] / 1e6:>8.2f}M{row['active_params'] / 1e6:>8.2f}M{row['train_tokens_per_s']:>13,.0f}"
            f"{row['train_tokens_per_s'] / baseline:>8.2f}x{row['decode_tokens_per_s']:>14,.0f}{row['peak_memory_mib']:>10,.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
