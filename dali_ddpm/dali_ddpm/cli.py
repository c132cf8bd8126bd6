"""`dali-ddpm train | sample | evaluate | export | demo` (one CLI shape for every Axon package)."""

from axon_shared.cli import Command, build_cli

main = build_cli(
    "dali-ddpm",
    {
        "train": Command(
            "dali_ddpm.train:train",
            "dali_ddpm.config:DDPMConfig",
            "train a DDPM (Ho et al. 2020) on fashion-mnist / mnist-5k / digits",
            default_preset="cpu",
        ),
        "sample": Command(
            "dali_ddpm.sample:sample", "dali_ddpm.config:SampleConfig", "sample a PNG grid (DDPM or DDIM) from a trained run"
        ),
        "evaluate": Command(
            "dali_ddpm.evaluate:evaluate",
            "dali_ddpm.config:EvaluateConfig",
            "FID-C vs its floor, class histogram, bits/dim, sampler timings",
        ),
        "export": Command(
            "dali_ddpm.export:export_command",
            "dali_ddpm.config:ExportConfig",
            "write a run as a diffusers DDPMPipeline folder (UNet2DModel + DDPMScheduler with our schedule)",
        ),
        "demo": Command("dali_ddpm.demo:demo", "dali_ddpm.config:DemoConfig", "<= 4 minute train + sample + evaluate, writes REPORT.md"),
    },
    description="dali-ddpm: Denoising Diffusion Probabilistic Models (Ho et al. 2020)",
)

if __name__ == "__main__":
    main()
