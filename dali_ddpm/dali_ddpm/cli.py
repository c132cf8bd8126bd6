"""`dali-ddpm train | sample | evaluate | demo` (one CLI shape for every Axon package).

`run(argv)` returns the command's result (a dict of metrics); `main(argv)` is the console script.
"""

from __future__ import annotations

from axon_shared.cli import Command, build_cli

from .config import DDPMConfig, DemoConfig, EvaluateConfig, SampleConfig


def _train(cfg):
    from .train import train

    return train(cfg)


def _sample(cfg):
    from .sample import sample

    return sample(cfg)


def _evaluate(cfg):
    from .evaluate import evaluate

    return evaluate(cfg)


def _demo(cfg):
    from .demo import demo

    return demo(cfg)


run = build_cli(
    "dali-ddpm",
    {
        "train": Command(_train, DDPMConfig, "train a DDPM (Ho et al. 2020) on fashion-mnist / mnist-5k / digits", default_preset="cpu"),
        "sample": Command(_sample, SampleConfig, "sample a PNG grid (DDPM or DDIM) from a trained run"),
        "evaluate": Command(_evaluate, EvaluateConfig, "FID-C vs its floor, class histogram, bits/dim, sampler timings"),
        "demo": Command(_demo, DemoConfig, "<= 4 minute train + sample + evaluate, writes REPORT.md"),
    },
    description="dali-ddpm: Denoising Diffusion Probabilistic Models (Ho et al. 2020)",
)



def main(argv=None) -> int:
    """Console entry point: runs the command (its result is returned by `run`) and exits 0."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
