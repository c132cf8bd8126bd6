"""Typed configs for x_llama: the model (`LlamaConfig`, Touvron et al. 2023, table 1/section 2.2) and the
commands (`TrainConfig`, `GenerateConfig`, `EvaluateConfig`, `DemoConfig`).

CLI flags map onto these dataclasses: `x-llama train --preset cpu --model.dim 128 --train.max_minutes 25`; the
`train` section is the shared vocabulary of axon_shared.training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from axon_shared import training as axon_training
from axon_shared.config import AxonConfig, ConfigError, require, require_choice, require_positive


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU hidden size (Llama 2 reference code): 2/3 of 4d, times the multiplier, rounded up to multiple_of.

    The 2/3 keeps the parameter count of a 3-matrix SwiGLU equal to a 2-matrix FFN with hidden 4d
    (Shazeer 2020, section 2): 3 * d * (2/3 * 4d) = 2 * d * 4d.
    """
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# ---- the architecture lab's options (x_llama.variants; README "The architecture lab") --------------------------------
POSITIONS = ("rope", "alibi", "nope")
ATTENTIONS = ("softmax", "differential")
FFNS = ("swiglu", "moe", "peer")
ROUTERS = ("none", "mod")
RESIDUALS = ("standard", "hyper")


@dataclass
class DifferentialConfig(AxonConfig):
    """Differential attention (Ye et al. 2024): lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init."""

    lambda_init: float | None = None  # None = the paper's depth schedule 0.8 - 0.6 exp(-0.3 (l - 1)), l = 1..L
    lambda_std: float = 0.1  # the lambda vectors are initialised N(0, lambda_std^2)

    def validate(self) -> None:
        require(self.lambda_std >= 0, self, "lambda_std", "must be >= 0")


@dataclass
class MoEConfig(AxonConfig):
    """Sparse mixture of SwiGLU experts (Shazeer et al. 2017; Switch, Fedus et al. 2021; Mixtral), dropless top-k."""

    n_experts: int = 8
    top_k: int = 2
    hidden_dim: int | None = None  # each expert's SwiGLU hidden size; None = the dense FFN's (Mixtral)
    aux_loss_weight: float = 0.01  # load balancing, Switch eq. 4 (alpha)
    z_loss_weight: float = 0.001  # router z-loss, ST-MoE eq. 5

    def validate(self) -> None:
        require_positive(self, "n_experts", "top_k")
        require(self.top_k <= self.n_experts, self, "top_k", f"must be <= n_experts={self.n_experts}")
        if self.hidden_dim is not None:
            require(self.hidden_dim > 0, self, "hidden_dim", "must be > 0 (or null for the dense FFN's size)")
        require(self.aux_loss_weight >= 0 and self.z_loss_weight >= 0, self, "aux_loss_weight", "loss weights must be >= 0")


@dataclass
class PEERConfig(AxonConfig):
    """Parameter-efficient expert retrieval (He 2024): product keys over n_experts singleton experts."""

    n_experts: int = 1024  # N = n^2 (product keys: two sub-key sets of size sqrt(N))
    heads: int = 4  # retrieval heads, each with its own query network
    top_k: int = 16  # experts per head
    key_dim: int | None = None  # query/key size; None = dim // 2
    query_batchnorm: bool = True  # the paper's BatchNorm on the query

    def validate(self) -> None:
        require_positive(self, "n_experts", "heads", "top_k")
        root = round(self.n_experts**0.5)
        require(root * root == self.n_experts, self, "n_experts", "must be a perfect square (product keys split it as n x n)")
        require(self.top_k <= root, self, "top_k", f"must be <= sqrt(n_experts)={root} (top-k of each sub-key set)")
        if self.key_dim is not None:
            require(self.key_dim > 0 and self.key_dim % 2 == 0, self, "key_dim", "must be a positive even number (or null)")


@dataclass
class MoDConfig(AxonConfig):
    """Mixture-of-Depths (Raposo et al. 2024): each routed block processes the top capacity * T tokens."""

    capacity: float = 0.125  # the paper's 12.5%
    every: int = 2  # route every `every`-th block (blocks 1, 3, 5, ... for 2, as in the paper); the others stay dense
    sampling: str = "predictor"  # causal routing at inference: "predictor" (auxiliary MLP) or "loss" (auxiliary BCE loss)
    aux_loss_weight: float = 0.01  # weight of the auxiliary BCE (router logits or predictor) against top-k membership

    def validate(self) -> None:
        require(0 < self.capacity <= 1, self, "capacity", "must be in (0, 1]")
        require_positive(self, "every")
        require_choice(self, "sampling", ("predictor", "loss"))
        require(self.aux_loss_weight >= 0, self, "aux_loss_weight", "must be >= 0")


@dataclass
class HyperConfig(AxonConfig):
    """Hyper-connections (Zhu et al. 2024): n residual streams mixed by learnable (static or dynamic) weights."""

    rate: int = 4  # expansion rate n
    dynamic: bool = True  # DHC (input-dependent weights) or SHC (static only)

    def validate(self) -> None:
        require_positive(self, "rate")


@dataclass
class LlamaConfig(AxonConfig):
    """Llama 2 architecture hyperparameters (names follow Meta's `ModelArgs`), plus the architecture lab's options
    (x_llama.variants); the defaults are Llama 2 exactly."""

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = n_heads (MHA); 1 = MQA; in between = GQA
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    init_std: float = 0.02  # not in the paper (Meta did not publish its init); see README "Deviations"
    # the architecture lab (x_llama.variants): defaults = Llama 2
    position: str = "rope"  # rope | alibi | nope
    attention: str = "softmax"  # softmax | differential
    ffn: str = "swiglu"  # swiglu | moe | peer
    router: str = "none"  # none | mod
    residual: str = "standard"  # standard | hyper
    differential: DifferentialConfig = field(default_factory=DifferentialConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    peer: PEERConfig = field(default_factory=PEERConfig)
    mod: MoDConfig = field(default_factory=MoDConfig)
    hyper: HyperConfig = field(default_factory=HyperConfig)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # Touvron et al. 2023, table 1 + the released params.json files.
        "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, max_seq_len=4096),
        "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, max_seq_len=4096),
        "llama2-70b": dict(
            dim=8192,
            n_layers=80,
            n_heads=64,
            n_kv_heads=8,
            ffn_dim_multiplier=1.3,
            multiple_of=4096,
            vocab_size=32000,
            max_seq_len=4096,
        ),
        # CPU sizes (ours): "cpu" for the real pretraining run, "tiny" for unit tests.
        "cpu": dict(dim=256, n_layers=6, n_heads=8, n_kv_heads=2, multiple_of=64, vocab_size=4096, max_seq_len=256),
        "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=512, max_seq_len=128),
    }

    def validate(self) -> None:
        require_positive(self, "vocab_size", "dim", "n_layers", "n_heads", "multiple_of", "max_seq_len", "norm_eps", "rope_theta")
        require(self.dim % self.n_heads == 0, self, "dim", f"must be divisible by n_heads={self.n_heads}")
        require(
            (self.dim // self.n_heads) % 2 == 0,
            self,
            "dim",
            f"head dim dim/n_heads={self.dim // self.n_heads} must be even (RoPE rotates pairs of dimensions)",
        )
        if self.n_kv_heads is not None:
            require(self.n_kv_heads > 0, self, "n_kv_heads", "must be > 0 (or null for n_heads)")
            require(
                self.n_heads % self.n_kv_heads == 0,
                self,
                "n_kv_heads",
                f"n_heads={self.n_heads} must be divisible by n_kv_heads (each kv head serves a group of query heads)",
            )
        if self.ffn_dim_multiplier is not None:
            require(self.ffn_dim_multiplier > 0, self, "ffn_dim_multiplier", "must be > 0 (or null)")
        require_choice(self, "position", POSITIONS)
        require_choice(self, "attention", ATTENTIONS)
        require_choice(self, "ffn", FFNS)
        require_choice(self, "router", ROUTERS)
        require_choice(self, "residual", RESIDUALS)
        if self.attention == "differential":
            require(
                self.n_heads % 2 == 0 and self.kv_heads % 2 == 0,
                self,
                "attention",
                f"differential attention pairs heads: n_heads={self.n_heads} and n_kv_heads={self.kv_heads} must be even",
            )

    @property
    def is_llama2(self) -> bool:
        """True for the plain Llama 2 architecture (what HF, GGUF and Meta export and the parity tests cover)."""
        return (self.position, self.attention, self.ffn, self.router, self.residual) == ("rope", "softmax", "swiglu", "none", "standard")

    def require_llama2(self, what: str) -> None:
        """Refuse a format or runtime that only knows Llama 2 (HF LlamaForCausalLM, Meta's layout, GGUF) for a variant."""
        if not self.is_llama2:
            raise ConfigError(
                f"{what} holds the plain Llama 2 architecture only; this model is {self.variant_summary()!r} "
                "(LlamaConfig.position/attention/ffn/router/residual). Run it with x-llama generate/evaluate/serve instead"
            )

    def variant_summary(self) -> str:
        """'alibi+differential+moe' style name of the non-default options ('llama2' when there are none)."""
        chosen = [
            value
            for value, default in zip(
                (self.position, self.attention, self.ffn, self.router, self.residual), ("rope", "softmax", "swiglu", "none", "standard")
            )
            if value != default
        ]
        return "+".join(chosen) or "llama2"

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def num_parameters(self) -> int:
        """Closed-form parameter count (README, "Parameter count"): 2Vd + L(2d^2 + 2d*Hkv*dh + 3d*h + 2d) + d.
        Llama 2 only: a variant's count is `Llama(config).num_parameters()` (build it on the meta device)."""
        if not self.is_llama2:
            raise ValueError(
                f"the closed-form count covers Llama 2 only, not {self.variant_summary()}; count Llama(config) on the meta device"
            )
        d, h, kv = self.dim, self.hidden_dim, self.kv_heads * self.head_dim
        per_layer = 2 * d * d + 2 * d * kv + 3 * d * h + 2 * d
        return 2 * self.vocab_size * d + self.n_layers * per_layer + d


@dataclass
class DataConfig(AxonConfig):
    """Pretraining data: en-text documents -> SentencePiece BPE ids -> random windows of seq_len + 1 tokens."""

    dataset: str = "en-text"
    seq_len: int = 256
    tokenizer_chars: int = 8_000_000  # characters of training text the tokenizer is trained on
    max_train_chars: int | None = None  # cap the pretraining text (tiny runs); None = everything
    max_valid_chars: int | None = None
    tokenizer: str | None = None  # path to an existing tokenizer.model; None = train one into out_dir

    def validate(self) -> None:
        require_positive(self, "seq_len", "tokenizer_chars")
        for name in ("max_train_chars", "max_valid_chars"):
            if getattr(self, name) is not None:
                require(getattr(self, name) > 0, self, name, "must be > 0 characters (or null for the whole split)")


@dataclass
class TrainSection(axon_training.TrainSection):
    """The shared `train` vocabulary (axon_shared.training) with Llama 2's values (section 2.2): AdamW (0.9, 0.95),
    eps 1e-5, weight decay 0.1 on matrices only, clipping 1.0, cosine decay to 10% of the peak after warm-up."""

    out_dir: str = "runs/x_llama/cpu"
    steps: int = 10_000
    batch_size: int = 16  # sequences of data.seq_len tokens per micro-batch
    lr: float = 3e-4
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta2: float = 0.95
    eps: float = 1e-5
    eval_every: int = 200
    checkpoint_every: int = 200
    seed: int = 1234
    min_lr_ratio: float = 0.1  # cosine decay to 10% of the peak
    eval_batches: int = 20  # fixed random windows of the valid split per evaluation
    activation_checkpointing: bool = False

    def validate(self) -> None:
        super().validate()
        require_positive(self, "eval_batches")
        require(0 <= self.min_lr_ratio <= 1, self, "min_lr_ratio", "must be in [0, 1]")


_TINY_MODEL = LlamaConfig.PRESETS["tiny"]
_CPU_MODEL = LlamaConfig.PRESETS["cpu"]


@dataclass
class TrainConfig(AxonConfig):
    """`x-llama train`: model + data + training. `model.vocab_size` is the tokenizer's vocabulary size."""

    model: LlamaConfig = field(default_factory=lambda: LlamaConfig.from_preset("cpu"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # The real CPU run (README "Results").
        "cpu": dict(
            model=_CPU_MODEL,
            data=dict(seq_len=256, tokenizer_chars=4_000_000),
            train=dict(
                out_dir="runs/x_llama/cpu",
                batch_size=16,
                lr=1.5e-3,
                warmup_steps=100,
                steps=2400,  # what bf16 + compile fit in 25 minutes on 2 threads (~8,000 tokens/s)
                bf16=True,
                compile=True,
                eval_every=200,
                eval_batches=10,
                checkpoint_every=200,
            ),
        ),
        # Pretrains in well under a minute: unit tests, notebooks, and instructgpt_rlhf's tests.
        "tiny": dict(
            model=_TINY_MODEL,
            data=dict(seq_len=64, tokenizer_chars=600_000, max_train_chars=1_500_000, max_valid_chars=100_000),
            train=dict(
                out_dir="runs/x_llama/tiny",
                batch_size=16,
                lr=3e-3,
                warmup_steps=20,
                steps=200,
                eval_every=100,
                eval_batches=5,
                checkpoint_every=100,
                log_every=10,
            ),
        ),
        # `make demo` (<= 4 minutes).
        "demo": dict(
            model=dict(_CPU_MODEL, dim=192, n_layers=4, n_heads=6, n_kv_heads=2, vocab_size=2048),
            data=dict(seq_len=128, tokenizer_chars=2_000_000, max_train_chars=6_000_000, max_valid_chars=300_000),
            train=dict(
                out_dir="runs/demo/x_llama",
                batch_size=16,
                lr=2e-3,
                warmup_steps=30,
                steps=320,
                max_minutes=3.0,
                eval_every=80,
                eval_batches=10,
                checkpoint_every=80,
            ),
        ),
    }

    def validate(self) -> None:
        require(
            self.data.seq_len <= self.model.max_seq_len,
            self,
            "data",
            f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
        )


@dataclass
class UptrainConfig(AxonConfig):
    """`x-llama uptrain`: GQA uptraining (Ainslie et al. 2023, section 2.1). The run `from_run` is converted to
    `n_kv_heads` key/value heads (`method`: mean-pool each group's heads, keep the group's first head, or draw new
    ones) and pretrained on for `fraction` of its steps (the paper's alpha) with the same data, batch and
    precision; the result is an ordinary x-llama run in `out_dir`."""

    from_run: str = "runs/x_llama/cpu_mha"
    n_kv_heads: int = 2
    method: str = "mean"
    fraction: float = 0.05  # alpha: the share of the original pretraining steps
    out_dir: str = "runs/x_llama/uptrain"
    lr: float | None = None  # None = where the original schedule ended (lr * min_lr_ratio), held constant
    warmup_steps: int = 10  # the converted model starts with a fresh optimizer
    seed: int = 1  # data order (and the random heads of method=random); the original run's seed is 1234
    eval_every: int | None = None  # None = 4 evaluations over the run
    eval_batches: int | None = None  # None = the original run's

    METHODS: ClassVar[tuple[str, ...]] = ("mean", "first", "random")

    def validate(self) -> None:
        require_positive(self, "n_kv_heads")
        require(self.method in self.METHODS, self, "method", f"must be one of {list(self.METHODS)}")
        require(0 < self.fraction <= 1, self, "fraction", "must be in (0, 1] (alpha = 0 is the converted model itself: `x-llama evaluate`)")
        require(self.warmup_steps >= 0, self, "warmup_steps", "must be >= 0")
        for name in ("lr", "eval_every", "eval_batches"):
            if getattr(self, name) is not None:
                require(getattr(self, name) > 0, self, name, "must be > 0 (or null for the default)")


@dataclass
class AblateConfig(AxonConfig):
    """`x-llama ablate`: train every named variant on the same budget and data order, --seeds times, and tabulate
    (x_llama.ablate; README "The architecture lab: ablation")."""

    variants: str = "baseline,alibi,nope,diff,moe,mod,peer,hyper,praxis"  # names of x_llama.ablate.VARIANTS
    base: str = "cpu"  # the TrainConfig preset every variant starts from (its size, data, optimiser)
    minutes: float = 8.0  # the token budget: what the baseline trains in this many minutes (when steps is null)
    steps: int | None = None  # the token budget in steps (overrides minutes)
    seeds: int = 2
    bf16: bool = True
    compile: bool = False  # one precision/compile mode for every variant; not every variant compiles to one graph
    eval_windows: int = 160  # valid windows at the training context (half as many at 2x, a quarter at 4x): 41k tokens
    out_dir: str = "runs/x_llama/ablate"

    def validate(self) -> None:
        from .ablate import VARIANTS

        names = [name.strip() for name in self.variants.split(",") if name.strip()]
        require(bool(names), self, "variants", f"name at least one of {list(VARIANTS)}")
        unknown = [name for name in names if name not in VARIANTS]
        require(not unknown, self, "variants", f"unknown {unknown}; choose from {list(VARIANTS)}")
        require(self.base in TrainConfig.PRESETS, self, "base", f"must be one of {sorted(TrainConfig.PRESETS)}")
        require_positive(self, "minutes", "seeds", "eval_windows")
        if self.steps is not None:
            require(self.steps > 0, self, "steps", "must be > 0 (or null to use minutes)")


@dataclass
class ExportConfig(AxonConfig):
    """`x-llama export`: a run (its latest checkpoint and tokenizer) as a llama.cpp GGUF file, a Hugging Face
    directory (save_pretrained) or Meta's params.json + consolidated.00.pth (x_llama.export)."""

    checkpoint: str = "runs/x_llama/cpu"
    format: str = "gguf"
    dtype: str = "f32"  # GGUF only: f32, f16 or q8_0
    out: str = "runs/x_llama/cpu/model.gguf"

    FORMATS: ClassVar[tuple[str, ...]] = ("gguf", "hf", "meta")
    DTYPES: ClassVar[tuple[str, ...]] = ("f32", "f16", "q8_0")

    def validate(self) -> None:
        require(self.format in self.FORMATS, self, "format", f"must be one of {list(self.FORMATS)}")
        require(self.dtype in self.DTYPES, self, "dtype", f"must be one of {list(self.DTYPES)}")
        require(
            self.format == "gguf" or self.dtype == "f32",
            self,
            "dtype",
            "only GGUF is written in f16 or q8_0; hf and meta keep the checkpoint's float32",
        )


@dataclass
class GenerateConfig(AxonConfig):
    """`x-llama generate`: sample from a run directory or checkpoint; the prompt from --prompt or stdin."""

    checkpoint: str = "runs/x_llama/cpu"
    prompt: str | None = None
    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = 0.95
    seed: int = 0
    use_cache: bool = True
    compile: bool = False  # each decoding step as one compiled graph (Llama.decode_step): ~3x tokens/s at batch 1, after ~5-20 s compiling

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"sample": {}, "greedy": dict(temperature=0.0, top_k=None, top_p=None)}

    def validate(self) -> None:
        require_positive(self, "max_new_tokens")
        require(self.use_cache or not self.compile, self, "compile", "decodes with the KV cache: set use_cache true, or compile false")
        require(self.temperature >= 0, self, "temperature", "must be >= 0 (0 = greedy)")
        if self.top_k is not None:
            require(self.top_k > 0, self, "top_k", "must be > 0 (or null)")
        if self.top_p is not None:
            require(0 < self.top_p <= 1, self, "top_p", "must be in (0, 1] (or null)")


@dataclass
class EvaluateConfig(AxonConfig):
    """`x-llama evaluate`: perplexity of a checkpoint on a split of en-text."""

    checkpoint: str = "runs/x_llama/cpu"
    split: str = "test"
    batches: int = 50
    batch_size: int = 16
    seed: int = 0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"test": {}, "valid": dict(split="valid")}

    def validate(self) -> None:
        require_positive(self, "batches", "batch_size")
        require(self.split in ("train", "valid", "test"), self, "split", "must be train, valid or test")


@dataclass
class DemoConfig(AxonConfig):
    """`x-llama demo`: a <= 4 minute pretraining run on en-text that writes <out_dir>/REPORT.md."""

    out_dir: str = "runs/demo/x_llama"
    max_minutes: float = 3.0

    def validate(self) -> None:
        require_positive(self, "max_minutes")
