"""Typed configs for dali_ddpm: the UNet, the diffusion process, training, sampling, evaluation, export and the demo.

Presets (`--preset NAME` on the command line):
- `cifar10`: the paper's CIFAR-10 model and recipe (Ho et al. 2020, appendix B): 35.7M parameters, T=1000,
  linear betas 1e-4..0.02, Adam 2e-4, batch 128, 5000 warm-up steps, EMA 0.9999, dropout 0.1, random flips.
- `cpu`: a 1.1M-parameter UNet for 28x28 grey images padded to 32x32, sized so that a 30-minute run on a 2-core
  CPU learns recognisable Fashion-MNIST samples (see README, "Deviations").
- `tiny`: unit tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from axon_shared import AxonConfig, require, require_choice, require_positive
from axon_shared import training as axon_training

HYBRID_MISSING = (
    "loss='hybrid': Nichol & Dhariwal's L_hybrid needs learned variances (and stops the mean's gradient in its L_vlb "
    "term), which this package does not implement; loss='simple_vlb' is L_simple + vlb_weight * L_vlb with the fixed "
    "variance, where L_vlb re-weights the same squared error (eq. 12)"
)


DATASETS = ("fashion-mnist", "mnist-5k", "digits")


@dataclass
class UNetConfig(AxonConfig):
    """The DDPM UNet (Ho et al. 2020, appendix B; PixelCNN++-style backbone with Wide-ResNet blocks)."""

    in_channels: int = 3
    ch: int = 128  # base channel count
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)  # channels per resolution level = ch * ch_mult[i]
    num_res_blocks: int = 2  # residual blocks per level on the way down (one more on the way up)
    attn_resolutions: tuple[int, ...] = (16,)  # feature-map sizes that get a self-attention block
    dropout: float = 0.1
    image_size: int = 32
    num_groups: int = 32  # GroupNorm groups
    norm_eps: float = 1e-6  # TensorFlow's GroupNorm epsilon, as in the original code

    PRESETS: ClassVar[dict] = {
        "cifar10": {},
        "cpu": dict(in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0),
        "tiny": dict(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, image_size=16),
    }

    def validate(self) -> None:
        require_positive(self, "in_channels", "ch", "num_res_blocks", "image_size", "num_groups")
        require(len(self.ch_mult) >= 1 and all(m > 0 for m in self.ch_mult), self, "ch_mult", "needs >= 1 positive multiplier")
        require(0.0 <= self.dropout < 1.0, self, "dropout", "must be in [0, 1)")
        levels = len(self.ch_mult)
        require(
            self.image_size % 2 ** (levels - 1) == 0, self, "image_size", f"must be divisible by 2^(len(ch_mult)-1) = {2 ** (levels - 1)}"
        )
        widths = [self.ch * m for m in self.ch_mult]
        require(all(w % self.num_groups == 0 for w in widths), self, "num_groups", f"must divide every level's width {widths}")
        sizes = [self.image_size // 2**i for i in range(levels)]
        bad = [r for r in self.attn_resolutions if r not in sizes]
        require(not bad, self, "attn_resolutions", f"{bad} are not feature-map sizes of this UNet ({sizes})")


@dataclass
class DiffusionConfig(AxonConfig):
    """The forward process q(x_t | x_0) and the reverse process's fixed variances (Ho et al. 2020, sections 2-3)."""

    timesteps: int = 1000  # T
    schedule: str = "linear"  # "linear" (the paper) or "cosine" (Nichol & Dhariwal 2021)
    beta_start: float = 1e-4
    beta_end: float = 0.02
    variance: str = "fixedlarge"  # sigma_t^2 = beta_t ("fixedlarge") or beta~_t ("fixedsmall")
    clip_denoised: bool = True  # clip the predicted x_0 to [-1, 1] while sampling
    prediction: str = "eps"  # the network predicts eps (the paper), x0, or v (Salimans & Ho 2022)
    loss: str = "simple"  # "simple" (L_simple, eq. 14) or "simple_vlb" (L_simple + vlb_weight * L_vlb, fixed variances)
    vlb_weight: float = 0.001
    loss_weight: str = "uniform"  # "uniform" (L_simple, eq. 14) or "min_snr" (Hang et al. 2023: min(SNR_t, gamma) / SNR_t)
    min_snr_gamma: float = 5.0

    def validate(self) -> None:
        require_positive(self, "timesteps", "min_snr_gamma")
        require_choice(self, "loss_weight", ("uniform", "min_snr"))
        require_choice(self, "schedule", ("linear", "cosine"))
        require_choice(self, "variance", ("fixedlarge", "fixedsmall"))
        require_choice(self, "prediction", ("eps", "x0", "v"))
        require(self.loss != "hybrid", self, "loss", HYBRID_MISSING)
        require_choice(self, "loss", ("simple", "simple_vlb"))
        require(0.0 < self.beta_start < self.beta_end < 1.0, self, "beta_end", f"need 0 < beta_start={self.beta_start} < beta_end < 1")
        require(self.vlb_weight >= 0, self, "vlb_weight", "must be >= 0")


@dataclass
class DataConfig(AxonConfig):
    """The images: an offline dataset of axon_shared.data, padded to the model's image_size."""

    dataset: str = "fashion-mnist"
    random_flip: bool = True  # random horizontal flips (the paper's CIFAR-10 augmentation)

    def validate(self) -> None:
        require_choice(self, "dataset", DATASETS)


@dataclass
class TrainSection(axon_training.TrainSection):
    """The shared `train` vocabulary (axon_shared.training) with the paper's values (Ho et al. 2020, appendix B):
    Adam 2e-4 after 5000 warm-up steps, then constant; batch 128; gradient clipping 1.0; EMA 0.9999; 800k steps."""

    out_dir: str = "runs/dali_ddpm/default"
    steps: int = 800_000
    batch_size: int = 128  # images per micro-batch and rank (the paper: 128 in all)
    lr: float = 2e-4
    warmup_steps: int = 5000
    eval_every: int = 1000  # validation L_simple on a fixed batch (raw and EMA weights)
    checkpoint_every: int = 5000
    keep_last: int = 3
    log_every: int = 50
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay_n = min(ema_decay, (1 + n) / (10 + n)); for runs much shorter than 1 / (1 - ema_decay)
    eval_size: int = 512  # validation images
    sample_every: int = 5000  # a sample grid from the EMA weights (DDIM, sample_steps steps); a multiple of eval_every
    sample_steps: int = 50
    sample_n: int = 64

    def validate(self) -> None:
        super().validate()
        require_positive(self, "eval_size", "sample_every", "sample_n", "sample_steps")
        require(0.0 <= self.ema_decay < 1.0, self, "ema_decay", "must be in [0, 1)")


@dataclass
class DDPMConfig(AxonConfig):
    """Everything `dali-ddpm train` needs; saved as config.json in the run directory."""

    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)

    PRESETS: ClassVar[dict] = {
        "cifar10": dict(model=UNetConfig.PRESETS["cifar10"]),
        "cpu": dict(
            model=UNetConfig.PRESETS["cpu"],
            data=dict(random_flip=False),
            train=dict(
                batch_size=64,
                lr=5e-4,
                warmup_steps=100,
                ema_decay=0.9995,
                ema_warmup=True,
                bf16=True,
                steps=100_000,
                max_minutes=30.0,
                log_every=25,
                eval_every=250,
                sample_every=1000,
                checkpoint_every=500,
                out_dir="runs/dali_ddpm/cpu",
            ),
        ),
        "tiny": dict(
            model=UNetConfig.PRESETS["tiny"],
            diffusion=dict(timesteps=100, beta_end=0.2),
            data=dict(dataset="digits", random_flip=False),
            train=dict(
                batch_size=16,
                warmup_steps=10,
                ema_decay=0.9,
                steps=20,
                log_every=5,
                eval_every=10,
                eval_size=32,
                sample_every=10,
                sample_steps=5,
                sample_n=16,
                checkpoint_every=10,
                out_dir="runs/dali_ddpm/tiny",
            ),
        ),
    }


@dataclass
class SampleConfig(AxonConfig):
    """`dali-ddpm sample`: a PNG grid (and a denoising-trajectory figure) from a trained run's EMA weights."""

    run_dir: str = "runs/dali_ddpm/cpu"
    checkpoint: str = ""  # default: the latest checkpoint in run_dir/checkpoints
    sampler: str = "ddpm"  # "ddpm" (ancestral, all T steps) or "ddim"
    steps: int | None = None  # DDIM steps (default 50); the DDPM sampler always takes all T steps
    eta: float = 0.0  # DDIM eta (0 = deterministic)
    n: int = 64
    batch_size: int = 64
    seed: int = 0
    trajectory: bool = True
    use_ema: bool = True
    out: str = ""  # default: run_dir/samples_<sampler>.png
    device: str = "auto"

    def validate(self) -> None:
        require_choice(self, "sampler", ("ddpm", "ddim"))
        require(
            self.steps is None or self.sampler == "ddim",
            self,
            "steps",
            "applies to the ddim sampler only (ddpm takes all T steps); add --sampler ddim",
        )
        require(self.steps is None or self.steps > 0, self, "steps", "must be > 0")
        require_positive(self, "n", "batch_size")
        require(self.eta >= 0, self, "eta", "must be >= 0")


@dataclass
class EvaluateConfig(AxonConfig):
    """`dali-ddpm evaluate`: FID-C (classifier-feature FID) vs its floor, class histogram, bits/dim, timings."""

    run_dir: str = "runs/dali_ddpm/cpu"
    checkpoint: str = ""
    samplers: tuple[str, ...] = ("ddpm", "ddim")
    ddim_steps: int = 50
    ddim_eta: float = 0.0  # 0: deterministic DDIM; 1: ancestral sampling on the ddim_steps sub-sequence (DDIM eq. 16)
    n_samples: int = 500  # samples per sampler (the FID-C floor uses the same number of test images)
    ddpm_samples: int = 0  # fewer samples for the slow 1000-step sampler (0 = n_samples)
    batch_size: int = 250
    ref_size: int = 10_000  # train images for the reference statistics
    bpd_images: int = 64  # test images for bits/dim
    bpd_timesteps: int = 100  # stratified Monte-Carlo estimate of the sum over t (T = all timesteps, exact)
    classifier_epochs: int = 2
    use_ema: bool = True  # evaluate the EMA weights (false: the raw weights)
    seed: int = 0
    device: str = "auto"
    out: str = ""  # default: run_dir/eval.json (eval_raw.json without EMA)

    def validate(self) -> None:
        bad = [s for s in self.samplers if s not in ("ddpm", "ddim")]
        require(not bad, self, "samplers", "each must be 'ddpm' or 'ddim'")
        require_positive(self, "ddim_steps", "n_samples", "batch_size", "ref_size", "bpd_images", "bpd_timesteps", "classifier_epochs")
        require(self.n_samples >= 2, self, "n_samples", "FID needs >= 2 samples")
        require(self.ddim_eta >= 0, self, "ddim_eta", "must be >= 0")


@dataclass
class ExportConfig(AxonConfig):
    """`dali-ddpm export`: a run's EMA (or raw) weights and its diffusion schedule as a diffusers `DDPMPipeline` folder
    (dali_ddpm.export), loadable with `DDPMPipeline.from_pretrained(out)` / `DDIMPipeline.from_pretrained(out)`."""

    run_dir: str = "runs/dali_ddpm/cpu"
    checkpoint: str = ""  # default: the latest checkpoint in run_dir/checkpoints
    format: str = "diffusers"
    use_ema: bool = True  # export the EMA weights (what `sample` and `evaluate` use); false: the raw weights
    out: str = ""  # default: run_dir/diffusers

    FORMATS: ClassVar[tuple[str, ...]] = ("diffusers",)

    def validate(self) -> None:
        require(self.format in self.FORMATS, self, "format", f"must be one of {list(self.FORMATS)}")


@dataclass
class DemoConfig(AxonConfig):
    """`dali-ddpm demo`: a <= 4 minute train + sample + evaluate writing REPORT.md. Chosen so that the samples are
    recognisable digits in that time (dali_ddpm/README.md, "make demo"): MNIST shrunk to 14x14 on a 16x16 canvas (a
    quarter of the 32x32 cost per step, so ~900 steps fit), the paper's T = 1000 linear schedule, and stochastic DDIM
    (eta = 1: ancestral sampling on a 50-step sub-sequence), which forgives an undertrained network's errors at high
    noise that deterministic DDIM (eta = 0) turns into noisy images."""

    out_dir: str = "runs/demo/dali_ddpm"
    dataset: str = "mnist-5k"
    image_size: int = 16
    max_minutes: float = 3.0  # training budget (the rest of the 4 minutes: FID-C classifier, sampling, bits/dim)
    ddim_steps: int = 50
    ddim_eta: float = 1.0
    n_samples: int = 200
    seed: int = 0

    def validate(self) -> None:
        require(self.max_minutes > 0, self, "max_minutes", "must be > 0")
        require_choice(self, "dataset", DATASETS)
        require_positive(self, "image_size", "ddim_steps")
        require(self.ddim_eta >= 0, self, "ddim_eta", "must be >= 0")
        require(self.n_samples >= 2, self, "n_samples", "FID needs >= 2 samples")
