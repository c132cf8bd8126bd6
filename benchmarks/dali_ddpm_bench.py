"""dali_ddpm UNet vs diffusers UNet2DModel: same layout, same weights, same process.

Layouts: `cifar10` (google/ddpm-cifar10-32, 35.7M parameters, built from its config with random weights; nothing is
downloaded) and `cpu` (this package's CPU preset). For each, the median time of
- a training step: forward, L_simple on the same x_t/t/eps, backward (Adam step excluded: identical code), in three
  precision modes, each side in the same one: fp32 eager, bf16 autocast eager, bf16 autocast + torch.compile (ours
  fullgraph, as `train.compile` does; diffusers' graph may break), with MFU against the fp32 and bf16 matmul peaks
  measured in the run (FLOPs counted by PyTorch's FlopCounterMode);
- a sampling step (fp32): one no-grad forward plus the DDPM update (ours: GaussianDiffusion.p_sample; theirs:
  DDPMScheduler.step), at batch sizes typical for sampling.
Ratio = diffusers time / our time (> 1: ours is faster). Runs interleaved (ours, theirs, ours, ...) so load
changes on a shared machine hit both equally. Use: python benchmarks/dali_ddpm_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from axon_shared.training import count_parameters
from common import MODES, counted_flops, interleaved, peaks, precision
from dali_ddpm.config import UNetConfig
from dali_ddpm.convert import diffusers_unet_kwargs, to_diffusers_state_dict
from dali_ddpm.diffusion import GaussianDiffusion, beta_schedule
from dali_ddpm.model import UNet

# diffusers' upsampling calls an lru_cache-wrapped version check that dynamo warns about on every compile
warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")


def bench(preset: str, train_batch: int, sample_batch: int, reps: int, machine: dict) -> list[tuple]:
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

    def train_step(model, mode: str):
        def loss_of(x_t, t, eps):
            out = model(x_t, t)
            return F.mse_loss(out if model is ours else out.sample, eps)

        # ours must capture one graph (the engine's train.compile); diffusers' UNet may break its graph
        loss_fn = torch.compile(loss_of, fullgraph=model is ours) if "compiled" in mode else loss_of

        def step():
            model.zero_grad(set_to_none=True)
            with precision(mode):
                loss = loss_fn(x_t, t, eps)
            loss.backward()

        return step

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
    params = f"{count_parameters(ours) / 1e6:.2f}M"
    flops = counted_flops(train_step(ours, "fp32 eager"))
    rows = []
    for mode in MODES:
        ma, mb = interleaved([train_step(ours, mode), train_step(theirs, mode)], reps, warmup=2)
        peak = machine["bf16" if "bf16" in mode else "fp32"]  # the peak of the mode's precision
        mfu = (flops / ma / machine["fp32"], flops / ma / peak, flops / mb / peak)
        rows.append((preset, params, f"train, {mode}", train_batch, ma * 1e3, mb * 1e3, mb / ma, *mfu))
        torch._dynamo.reset()
    ma, mb = interleaved([sample_ours, sample_theirs], reps, warmup=1)
    rows.append((preset, params, "sample, fp32", sample_batch, ma * 1e3, mb * 1e3, mb / ma, None, None, None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches, 2 repetitions (smoke run)")
    args = parser.parse_args()
    threads = int(os.environ.get("AXON_THREADS", 0))
    if threads:
        torch.set_num_threads(threads)
    reps = 2 if args.quick else 5
    machine = peaks(512 if args.quick else 1024)
    plans = [("cpu", 8, 16), ("cifar10", 1, 2)] if args.quick else [("cpu", 64, 128), ("cifar10", 4, 16)]
    rows = []
    for preset, train_batch, sample_batch in plans:
        rows += bench(preset, train_batch, sample_batch, reps, machine)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {reps} interleaved runs; measured matmul peak "
        f"fp32 {machine['fp32'] / 1e9:.0f} GFLOP/s, bf16 {machine['bf16'] / 1e9:.0f} GFLOP/s"
    )
    header = (
        f"{'layout':<8} {'params':>7} {'measure':<22} {'batch':>5} {'ours ms':>9} {'diffusers ms':>13} {'ratio':>6}"
        f" {'MFU fp32':>9} {'MFU mode':>9} {'theirs mode':>12}"
    )
    print(header)
    print("-" * len(header))
    for preset, params, name, batch, ma, mb, ratio, *mfu in rows:
        cells = " ".join(f"{m:>{w}.1%}" if m is not None else " " * w for m, w in zip(mfu, (9, 9, 12)))
        print(f"{preset:<8} {params:>7} {name:<22} {batch:>5} {ma:>9.1f} {mb:>13.1f} {ratio:>6.2f} {cells}")
    print(
        "ratio = diffusers time / our time (> 1: ours faster); MFU: counted training FLOPs / time / measured peak "
        "(fp32, and the peak of the row's precision)"
    )


if __name__ == "__main__":
    main()
