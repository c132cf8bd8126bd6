"""dali_ddpm UNet vs diffusers UNet2DModel: same layout, same weights, same process.

Layouts: `cifar10` (google/ddpm-cifar10-32, 35.7M parameters, built from its config with random weights; nothing is
downloaded) and `cpu` (this package's CPU preset). For each, the median time of
- a training step: forward, L_simple on the same x_t/t/eps, backward (Adam step excluded: identical code);
- a sampling step: one no-grad forward plus the DDPM update (ours: GaussianDiffusion.p_sample; theirs:
  DDPMScheduler.step), at batch sizes typical for sampling.
Ratio = diffusers time / our time (> 1: ours is faster). Runs interleaved (ours, theirs, ours, ...) so load
changes on a shared machine hit both equally. Use: python benchmarks/dali_ddpm_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from axon_shared.training import count_parameters
from dali_ddpm.config import UNetConfig
from dali_ddpm.convert import diffusers_unet_kwargs, to_diffusers_state_dict
from dali_ddpm.diffusion import GaussianDiffusion, beta_schedule
from dali_ddpm.model import UNet


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def bench(preset: str, train_batch: int, sample_batch: int, reps: int) -> list[tuple]:
    cfg = UNetConfig.from_preset(preset, dropout=0.0)
    torch.manual_seed(0)
    ours = UNet(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    theirs = UNet2DModel(**diffusers_unet_kwargs(cfg))
    theirs.load_state_dict(to_diffusers_state_dict(ours.state_dict()))
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000), variance="fixedsmall")
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    s, c = cfg.image_size, cfg.in_channels

    x = torch.randn(train_batch, c, s, s)
    t = torch.randint(0, 1000, (train_batch,))
    eps = torch.randn_like(x)
    x_t = diffusion.q_sample(x, t, eps)

    def train_ours():
        ours.zero_grad(set_to_none=True)
        F.mse_loss(ours(x_t, t), eps).backward()

    def train_theirs():
        theirs.zero_grad(set_to_none=True)
        F.mse_loss(theirs(x_t, t).sample, eps).backward()

    xs = torch.randn(sample_batch, c, s, s)
    ts = torch.full((sample_batch,), 500)
    noise = torch.randn_like(xs)
    gen = torch.Generator()

    @torch.no_grad()
    def sample_ours():
        diffusion.p_sample(ours(xs, ts), xs, ts, noise)

    @torch.no_grad()
    def sample_theirs():
        scheduler.step(theirs(xs, ts).sample, 500, xs, generator=gen.manual_seed(0))

    with torch.no_grad():
        assert torch.allclose(ours(xs[:2], ts[:2]), theirs(xs[:2], ts[:2]).sample, atol=1e-4), "outputs differ: not the same model"
    rows = []
    for name, a, b, batch in [
        ("train step", train_ours, train_theirs, train_batch),
        ("sampling step", sample_ours, sample_theirs, sample_batch),
    ]:
        a(), b()  # warm-up
        ta, tb = [], []
        for _ in range(reps):
            ta += timed(a, 1)
            tb += timed(b, 1)
        ma, mb = statistics.median(ta), statistics.median(tb)
        rows.append((preset, f"{count_parameters(ours) / 1e6:.2f}M", name, batch, ma * 1e3, mb * 1e3, mb / ma))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches, 2 repetitions (smoke run)")
    args = parser.parse_args()
    threads = int(os.environ.get("AXON_THREADS", 0))
    if threads:
        torch.set_num_threads(threads)
    reps = 2 if args.quick else 5
    plans = [("cpu", 8, 16), ("cifar10", 1, 2)] if args.quick else [("cpu", 64, 128), ("cifar10", 4, 16)]
    rows = []
    for preset, train_batch, sample_batch in plans:
        rows += bench(preset, train_batch, sample_batch, reps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {reps} interleaved runs")
    header = f"{'layout':<8} {'params':>7} {'measure':<14} {'batch':>5} {'ours ms':>9} {'diffusers ms':>13} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for preset, params, name, batch, ma, mb, ratio in rows:
        print(f"{preset:<8} {params:>7} {name:<14} {batch:>5} {ma:>9.1f} {mb:>13.1f} {ratio:>6.2f}")
    print("ratio = diffusers time / our time (> 1: ours faster)")


if __name__ == "__main__":
    main()
