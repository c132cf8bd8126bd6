"""What every benchmark here shares: interleaved timing, the machine's measured matmul peaks (the MFU
denominators), FLOPs counted by PyTorch, and the three precision modes every training row is measured in.

The benchmarks are scripts (`python benchmarks/<package>_bench.py`); Python puts their folder on sys.path, so
they import this file as `common`.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from axon_shared.training import native_bf16

# bf16 where the CPU multiplies it natively (AVX512 / AMX); on an AVX2-only CPU bf16 is emulated (~150x slower
# matmuls), so its rows would measure the emulation: the compiled mode is then measured in float32 instead
BF16 = native_bf16(torch.device("cpu"))
MODES = ("fp32 eager", "bf16 eager", "bf16 compiled") if BF16 else ("fp32 eager", "fp32 compiled")
if not BF16:
    print(
        f"note: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16 matmul, so the bf16 modes are left out; "
        "the compiled mode runs in float32"
    )


def precision(mode: str):
    """The autocast context of a mode: bf16 autocast on CPU for the bf16 modes, nothing for fp32."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in mode else contextlib.nullcontext()


def interleaved(fns: list, repeats: int, warmup: int = 2) -> list[float]:
    """Median seconds of each fn, timed in turn (a, b, a, b, ...) so that the load of other processes on a shared
    machine hits every side alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def matmul_peak(dtype: torch.dtype, size: int = 1024, repeats: int = 30) -> float:
    """Best measured matmul throughput (FLOP/s) in `dtype`: the fastest of `repeats` square matmuls (the machine is
    shared, so the best run is the closest to what the hardware can do)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peaks(size: int = 1024) -> dict[str, float]:
    """The fp32 and bf16 matmul peaks of this machine, measured now (bf16: NaN where it is emulated, see BF16)."""
    return {"fp32": matmul_peak(torch.float32, size), "bf16": matmul_peak(torch.bfloat16, size) if BF16 else float("nan")}


def counted_flops(step) -> float:
    """FLOPs of one call of `step` (eager fp32) as PyTorch's FlopCounterMode counts them: matmuls, convolutions and
    attention, forward and backward; element-wise work is not counted, as in the usual MFU definition."""
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())
