"""Typed configs for each stage: `sft`, `reward`, `ppo`, `dpo`, `evaluate`, `pipeline` and `demo`.

Paper values (InstructGPT, Ouyang et al. 2022, appendix C; DPO, Rafailov et al. 2023, section 6 / appendix B) are
the defaults where they make sense at our scale; the README's hyperparameter table lists paper vs presets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from axon_shared import training as axon_training
from axon_shared.config import AxonConfig, require, require_choice, require_positive
from axon_shared.schedules import CosineSchedule


@dataclass
class TrainSection(axon_training.TrainSection):
    """The shared `train` vocabulary (axon_shared.training) for the stages: AdamW (0.9, 0.95), linear warm-up, then
    cosine decay to min_lr_ratio of the peak. Each stage's subclass holds its own defaults."""

    out_dir: str = "runs/instructgpt_rlhf/stage"
    steps: int = 200
    lr: float = 1e-4
    warmup_steps: int = 10
    beta2: float = 0.95
    eval_every: int = 50
    keep_last: int = 1
    min_lr_ratio: float = 0.1

    def validate(self) -> None:
        super().validate()
        require(0 <= self.min_lr_ratio <= 1, self, "min_lr_ratio", "must be in [0, 1]")

    def schedule(self) -> CosineSchedule:
        return CosineSchedule(self.lr, self.warmup_steps, self.steps, self.min_lr_ratio)


@dataclass
class SFTTrain(TrainSection):
    out_dir: str = "runs/instructgpt_rlhf/sft"
    steps: int = 600
    batch_size: int = 32  # demonstrations per step
    lr: float = 1e-3
    warmup_steps: int = 30
    max_minutes: float | None = 4.0
    eval_every: int = 100
    bf16: bool = True


@dataclass
class RewardTrain(TrainSection):
    out_dir: str = "runs/instructgpt_rlhf/reward"
    steps: int = 2000
    batch_size: int = 8  # prompts per step, each with its K completions and C(K,2) pairs
    lr: float = 3e-4
    warmup_steps: int = 50
    max_minutes: float | None = 11.0
    eval_every: int = 250
    checkpoint_every: int = 250
    bf16: bool = True


@dataclass
class PPOTrain(TrainSection):
    out_dir: str = "runs/instructgpt_rlhf/ppo"
    steps: int = 50  # PPO iterations (rollout + ppo_epochs of minibatch updates)
    batch_size: int = 64  # prompts (rollouts) per iteration
    lr: float = 5e-5
    warmup_steps: int = 5
    min_lr_ratio: float = 1.0
    max_minutes: float | None = 4.0
    eval_every: int = 10
    checkpoint_every: int = 10
    log_every: int = 1
    bf16: bool = True  # the forward passes after the rollout (`ppo_iteration`); sampling stays float32


@dataclass
class DPOTrain(TrainSection):
    out_dir: str = "runs/instructgpt_rlhf/dpo"
    steps: int = 130
    batch_size: int = 16  # preference pairs per step
    lr: float = 2e-4
    min_lr_ratio: float = 1.0
    max_minutes: float | None = 3.0
    eval_every: int = 65
    checkpoint_every: int = 65
    bf16: bool = True  # the policy's forward; the frozen reference's log-probs stay float32


@dataclass
class SamplingConfig(AxonConfig):
    """Prompts (the first min_tokens..max_tokens tokens of a snippet) and completion sampling."""

    min_prompt_tokens: int = 2
    max_prompt_tokens: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0  # rollouts and preference samples: plain softmax sampling (no top-k/top-p: KL stays >= 0)
    batch_size: int = 64
    compile: bool = False  # each decoding step as one compiled graph (x_llama `generate(compile=True)`); the first batch compiles

    def validate(self) -> None:
        require_positive(self, "min_prompt_tokens", "max_prompt_tokens", "max_new_tokens", "batch_size")
        require(self.temperature >= 0, self, "temperature", "must be >= 0 (0 = greedy, evaluation only)")
        require(self.min_prompt_tokens <= self.max_prompt_tokens, self, "min_prompt_tokens", "must be <= max_prompt_tokens")


@dataclass
class SFTConfig(AxonConfig):
    """`sft`: supervised fine-tuning of a pretrained x_llama on the movie-review snippets (the demonstrations)."""

    pretrained: str = "runs/instructgpt_rlhf/pretrain"  # an x_llama run dir (or checkpoint)
    max_len: int = 64  # tokens per demonstration (bos + snippet + eos), longer ones are truncated
    max_train: int | None = None  # cap the number of demonstrations (tiny runs)
    max_valid: int = 256  # valid-split demonstrations for the held-out loss
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: SFTTrain = field(default_factory=SFTTrain)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "cpu": {},
        "tiny": dict(
            max_train=128,
            max_valid=16,
            max_len=40,
            train=dict(
                steps=6,
                batch_size=8,
                lr=1e-4,
                warmup_steps=2,
                max_minutes=None,
                bf16=False,
                eval_every=3,
                checkpoint_every=3,
                progress=False,
            ),
        ),
    }

    def validate(self) -> None:
        require(self.max_len >= 4, self, "max_len", "must be >= 4")


@dataclass
class LabelerConfig(AxonConfig):
    """A simulated pool of labelers of unequal reliability (`labelers.py`; Yamagata et al. 2021). n = 1: the single
    ground-truth labeller, exactly the behaviour without a pool. n > 1: each training prompt's pairs are voted on by
    `per_prompt` of the n labelers, labeler k keeping the truth with probability c_k (honest: c_k ~ U[low, high];
    a fraction `adversarial` of them: c_k = 1 - U[low, high]); the votes are aggregated by `aggregation`."""

    n: int = 1
    per_prompt: int = 3  # labelers per prompt (each votes on all its pairs); sparse, as in practice
    reliability_low: float = 0.6
    reliability_high: float = 0.95
    adversarial: float = 0.0  # fraction of the n labelers who flip (reliability 1 - U[low, high])
    aggregation: str = "weighted"  # majority | pool | weighted (EM reliabilities -> soft labels)
    prior_alpha: float = 2.0  # Beta(alpha, beta) prior on each reliability in the EM's M-step (MAP)
    prior_beta: float = 2.0
    seed: int = 0

    def validate(self) -> None:
        require(self.n >= 1, self, "n", "must be >= 1 (1 = the single ground-truth labeller)")
        require(self.n > 1 or self.adversarial == 0, self, "adversarial", "needs a pool (n > 1); n = 1 is the single ground-truth labeller")
        require(
            0 <= self.adversarial < 0.5,
            self,
            "adversarial",
            "must be in [0, 0.5): with half or more flipping, truth and its mirror are indistinguishable",
        )
        if self.n > 1:
            require(1 <= self.per_prompt <= self.n, self, "per_prompt", f"must be in [1, n={self.n}]")
        require(0.5 <= self.reliability_low <= 1, self, "reliability_low", "must be in [0.5, 1] (honest labelers; adversaries get 1 - c)")
        require(
            self.reliability_low <= self.reliability_high <= 1,
            self,
            "reliability_high",
            f"must be in [reliability_low={self.reliability_low}, 1]",
        )
        require_choice(self, "aggregation", ["majority", "pool", "weighted"])
        for name in ("prior_alpha", "prior_beta"):
            require(getattr(self, name) >= 1, self, name, "must be >= 1 (the M-step is the Beta prior's MAP estimate)")


@dataclass
class RewardConfig(AxonConfig):
    """`reward`: sample K completions per prompt from the SFT policy, label them with VADER, train the RM."""

    sft: str = "runs/instructgpt_rlhf/sft"
    num_prompts: int = 8192  # training prompts (prefixes of train-split snippets)
    num_valid_prompts: int = 256  # held-out prompts (valid split) for pair accuracy
    k: int = 6  # completions per prompt -> C(K,2) pairs (InstructGPT: K = 4..9); each completion is scored once
    bt_temperature: float = 0.0  # Bradley-Terry label noise; 0 = the higher ground-truth score always wins
    samples_from: str | None = None  # an earlier reward run dir: reuse its sampled, truth-labelled completions (no sampling)
    labelers: LabelerConfig = field(default_factory=LabelerConfig)  # n > 1: a simulated labeler pool relabels the train pairs
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: RewardTrain = field(default_factory=RewardTrain)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "cpu": {},
        "tiny": dict(
            num_prompts=16,
            num_valid_prompts=8,
            k=4,
            sampling=dict(max_new_tokens=12, batch_size=16),
            train=dict(
                steps=6,
                batch_size=4,
                lr=1e-4,
                warmup_steps=1,
                max_minutes=None,
                bf16=False,
                eval_every=3,
                checkpoint_every=3,
                progress=False,
            ),
        ),
    }

    def validate(self) -> None:
        require(self.k >= 2, self, "k", "need at least 2 completions per prompt to form a pair")
        require_positive(self, "num_prompts", "num_valid_prompts")
        require(self.bt_temperature >= 0, self, "bt_temperature", "must be >= 0")


@dataclass
class PPOConfig(AxonConfig):
    """`ppo`: PPO against the reward model with a per-token KL penalty to the SFT policy (InstructGPT eq. 2)."""

    sft: str = "runs/instructgpt_rlhf/sft"
    reward_model: str = "runs/instructgpt_rlhf/reward"
    num_prompts: int = 4096
    eval_prompts: int = 64  # valid-split prompts for the reward/KL curve logged every eval_every iterations
    kl_coef: float = 0.05  # beta (InstructGPT: 0.02)
    target_kl: float | None = None  # set for the adaptive controller (Ziegler et al. 2019); None = fixed kl_coef
    kl_horizon: int = 10000
    ppo_epochs: int = 2
    minibatch_size: int = 16
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    missing_eos_penalty: float = 1.0  # subtracted from the RM score of a completion that never emitted EOS
    ptx_coef: float = 0.0  # PPO-ptx gamma (InstructGPT: 27.8); > 0 mixes the pretraining LM loss in
    ptx_batch_size: int = 8
    ptx_seq_len: int = 64
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: PPOTrain = field(default_factory=PPOTrain)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "cpu": {},
        "tiny": dict(
            num_prompts=32,
            eval_prompts=8,
            ppo_epochs=2,
            minibatch_size=4,
            sampling=dict(max_new_tokens=10, batch_size=8),
            train=dict(
                steps=3,
                batch_size=8,
                lr=1e-4,
                warmup_steps=0,
                min_lr_ratio=0.1,
                max_minutes=None,
                log_every=10,
                eval_every=3,
                checkpoint_every=2,
                bf16=False,
                progress=False,
            ),
        ),
    }

    def validate(self) -> None:
        require(self.kl_coef >= 0, self, "kl_coef", "must be >= 0")
        require(self.sampling.temperature > 0, self, "sampling", "PPO needs sampling.temperature > 0 (it divides the logits in the loss)")
        require_positive(self, "ppo_epochs", "minibatch_size", "clip_range", "clip_range_value", "num_prompts")
        require(0 <= self.lam <= 1, self, "lam", "must be in [0, 1]")
        require(0 < self.gamma <= 1, self, "gamma", "must be in (0, 1]")
        require(self.ptx_coef >= 0, self, "ptx_coef", "must be >= 0")
        require(
            self.train.batch_size % self.minibatch_size == 0,
            self,
            "minibatch_size",
            f"must divide train.batch_size={self.train.batch_size} (the rollouts of an iteration)",
        )
        if self.target_kl is not None:
            require(self.target_kl > 0, self, "target_kl", "must be > 0 (or null for a fixed coefficient)")


@dataclass
class DPOConfig(AxonConfig):
    """`dpo`: direct preference optimisation on the reward stage's ground-truth-labelled pairs (DPO eq. 7)."""

    sft: str = "runs/instructgpt_rlhf/sft"
    preferences: str = "runs/instructgpt_rlhf/reward"  # the reward run dir (its preferences_train.jsonl)
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid (DPO), ipo
    label_smoothing: float = 0.0  # > 0: conservative DPO
    eval_prompts: int = 64  # valid-split prompts for the reward/KL curve logged every eval_every steps
    max_valid_pairs: int = 1024  # held-out pairs for the valid margin / accuracy
    train: DPOTrain = field(default_factory=DPOTrain)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "cpu": {},
        "tiny": dict(
            eval_prompts=8,
            train=dict(
                steps=4,
                batch_size=4,
                lr=1e-4,
                warmup_steps=0,
                min_lr_ratio=0.1,
                max_minutes=None,
                eval_every=2,
                checkpoint_every=2,
                bf16=False,
                progress=False,
            ),
        ),
    }

    def validate(self) -> None:
        require_positive(self, "beta", "max_valid_pairs")
        require_choice(self, "loss_type", ["sigmoid", "ipo"])
        require(0 <= self.label_smoothing < 0.5, self, "label_smoothing", "must be in [0, 0.5)")


@dataclass
class EvaluateConfig(AxonConfig):
    """`evaluate`: ground-truth reward, KL to the SFT policy, win rate, RM-vs-truth for each policy."""

    sft: str = "runs/instructgpt_rlhf/sft"
    reward_model: str | None = "runs/instructgpt_rlhf/reward"
    policies: tuple[str, ...] = ()  # run dirs of PPO/DPO policies
    names: tuple[str, ...] = ()  # optional labels for the policies (default: from each run's config)
    out_dir: str = "runs/instructgpt_rlhf/eval"
    num_prompts: int = 256  # test-split prompts
    num_samples: int = 8  # sample completions written to the report per policy
    seed: int = 1
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "cpu": {},
        "tiny": dict(num_prompts=16, num_samples=2, sampling=dict(max_new_tokens=10)),
    }

    def validate(self) -> None:
        require_positive(self, "num_prompts")
        require(
            not self.names or len(self.names) == len(self.policies),
            self,
            "names",
            f"give one name per policy ({len(self.policies)}) or none",
        )


@dataclass
class PipelineConfig(AxonConfig):
    """`pipeline`: pretrain (x_llama) -> SFT -> RM -> PPO at each kl_coef, DPO at each beta -> evaluate."""

    out_dir: str = "runs/instructgpt_rlhf/cpu"
    pretrain_preset: str = "demo"  # an x_llama TrainConfig preset
    pretrain_overrides: dict = field(
        default_factory=lambda: {"train": {"steps": 1600, "max_minutes": 7.0, "bf16": True, "eval_every": 200, "checkpoint_every": 200}}
    )  # e.g. {"train": {"steps": 300}}
    pretrained: str | None = None  # reuse an existing x_llama run dir instead of pretraining
    kl_coefs: tuple[float, ...] = (0.05, 0.2, 0.5)
    betas: tuple[float, ...] = (0.1, 0.5)
    labelers: LabelerConfig = field(default_factory=LabelerConfig)  # passed to the reward stage (replaces reward.labelers)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "cpu": {},
        "tiny": dict(
            out_dir="runs/instructgpt_rlhf/tiny",
            pretrain_preset="tiny",
            pretrain_overrides={"train": {"steps": 30, "eval_every": 30, "checkpoint_every": 30, "progress": False}},
            kl_coefs=(0.05,),
            betas=(0.1,),
            sft=SFTConfig.PRESETS["tiny"],
            reward=RewardConfig.PRESETS["tiny"],
            ppo=PPOConfig.PRESETS["tiny"],
            dpo=DPOConfig.PRESETS["tiny"],
            evaluate=EvaluateConfig.PRESETS["tiny"],
        ),
        # `make demo`: the whole pipeline in about 3 minutes on 2 cores. The tiny model is fast enough to sample
        # preferences for 4,000 prompts, and its reward model needs a 10x higher learning rate than the cpu preset's
        # (README, "make demo"): at 3e-4 it stayed at chance, and PPO then lowered the reward.
        "demo": dict(
            out_dir="runs/demo/instructgpt_rlhf",
            pretrain_preset="tiny",
            pretrain_overrides={
                "train": {"steps": 1500, "max_minutes": 1.0, "eval_every": 500, "checkpoint_every": 500, "progress": False}
            },
            kl_coefs=(0.05,),
            betas=(0.1,),
            sft=dict(
                max_len=48,
                max_valid=64,
                train=dict(steps=600, warmup_steps=10, eval_every=200, checkpoint_every=200, max_minutes=0.8, progress=False),
            ),
            reward=dict(
                num_prompts=4000,
                num_valid_prompts=40,
                sampling=dict(max_new_tokens=24),
                train=dict(steps=700, lr=3e-3, warmup_steps=20, eval_every=350, checkpoint_every=350, max_minutes=1.0, progress=False),
            ),
            ppo=dict(
                num_prompts=512,
                eval_prompts=64,
                sampling=dict(max_new_tokens=24, batch_size=32),
                minibatch_size=16,
                train=dict(steps=80, batch_size=32, warmup_steps=2, eval_every=16, checkpoint_every=16, max_minutes=0.8, progress=False),
            ),
            dpo=dict(
                eval_prompts=32, train=dict(steps=200, warmup_steps=5, eval_every=50, checkpoint_every=50, max_minutes=0.5, progress=False)
            ),
            evaluate=dict(num_prompts=256, num_samples=3, sampling=dict(max_new_tokens=24)),
        ),
    }


@dataclass
class DemoConfig(AxonConfig):
    """`demo`: the pipeline at demo scale (about 3 minutes on 2 cores), writing <out_dir>/REPORT.md."""

    out_dir: str = "runs/demo/instructgpt_rlhf"
    pretrained: str | None = None  # an x_llama run dir to start from (else x_llama tiny is pretrained first)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"demo": {}}
