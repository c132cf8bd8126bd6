"""Typed configs with presets: the model (paper section 3, Table 3), the data, the training loop and the commands.

Token ids are fixed by the tokenizer we train (`axon_shared.tokenizer.train_sentencepiece`):
unk 0, bos 1, eos 2, **pad 3** (pad is its own token, never equal to eos, so the EOS label is never masked).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from axon_shared import training as axon_training
from axon_shared.config import AxonConfig, require, require_choice, require_positive

CORPORA = ("de-en-libreoffice", "de-en-ding", "de-en-bible")


@dataclass
class TransformerConfig(AxonConfig):
    """The encoder-decoder of Vaswani et al. (2017). Defaults are the `cpu` preset; see PRESETS."""

    vocab_size: int = 8000
    pad_id: int = 3
    bos_id: int = 1
    eos_id: int = 2
    d_model: int = 256
    n_heads: int = 4
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    d_ff: int = 1024
    dropout: float = 0.1  # P_drop: residual branches and embeddings + positions (section 5.4)
    attention_dropout: float = 0.0  # on attention weights; not in the paper, torch.nn.Transformer uses `dropout`
    activation: str = "relu"
    label_smoothing: float = 0.1  # eps_ls (section 5.4)
    max_len: int = 256  # longest source or target sequence in tokens (including bos/eos)
    norm_first: bool = False  # False = post-norm, the paper's LayerNorm(x + Sublayer(x)); True = pre-norm
    layer_norm_eps: float = 1e-5

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # Table 3, "base": N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1, eps_ls=0.1; shared 37k BPE vocabulary.
        "base": dict(vocab_size=37000, d_model=512, n_heads=8, n_encoder_layers=6, n_decoder_layers=6, d_ff=2048, dropout=0.1),
        # Table 3, "big": d_model=1024, d_ff=4096, h=16, P_drop=0.3.
        "big": dict(vocab_size=37000, d_model=1024, n_heads=16, n_encoder_layers=6, n_decoder_layers=6, d_ff=4096, dropout=0.3),
        # One CPU thread, 30 minutes: narrow and shallow, small joint vocabulary.
        "cpu": dict(vocab_size=8000, d_model=256, n_heads=4, n_encoder_layers=3, n_decoder_layers=3, d_ff=1024, dropout=0.05),
        # Unit tests: seconds.
        "tiny": dict(vocab_size=96, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=64, dropout=0.1, max_len=64),
    }

    def validate(self) -> None:
        require_positive(self, "vocab_size", "d_model", "n_heads", "n_encoder_layers", "n_decoder_layers", "d_ff", "max_len")
        require(self.d_model % self.n_heads == 0, self, "d_model", f"must be divisible by n_heads={self.n_heads}")
        require(self.d_model % 2 == 0, self, "d_model", "must be even (sinusoidal positions pair sin/cos)")
        for name in ("dropout", "attention_dropout", "label_smoothing"):
            require(0.0 <= getattr(self, name) < 1.0, self, name, "must be in [0, 1)")
        require_choice(self, "activation", ["relu", "gelu"])
        for name in ("pad_id", "bos_id", "eos_id"):
            require(0 <= getattr(self, name) < self.vocab_size, self, name, f"must be a token id in [0, vocab_size={self.vocab_size})")
        require(len({self.pad_id, self.bos_id, self.eos_id}) == 3, self, "pad_id", "pad, bos and eos ids must differ")
        require(self.layer_norm_eps > 0, self, "layer_norm_eps", "must be > 0")


@dataclass
class DataConfig(AxonConfig):
    """Which parallel corpora, which direction, how to tokenize."""

    corpora: tuple[str, ...] = ("de-en-libreoffice",)
    src_lang: str = "en"
    tgt_lang: str = "de"
    train_limit: int = 0  # use only the first N training pairs per corpus (0 = all)
    valid_limit: int = 0  # use only the first N validation pairs per corpus (0 = all)
    spm_sample: int = 200_000  # sentences fed to SentencePiece training (of source + target train text)

    def validate(self) -> None:
        require(len(self.corpora) > 0, self, "corpora", f"choose at least one of {list(CORPORA)}")
        unknown = [c for c in self.corpora if c not in CORPORA]
        require(not unknown, self, "corpora", f"unknown {unknown}; choose from {list(CORPORA)}")
        require_choice(self, "src_lang", ["en", "de"])
        require_choice(self, "tgt_lang", ["en", "de"])
        require(self.src_lang != self.tgt_lang, self, "tgt_lang", "must differ from src_lang")
        require_positive(self, "spm_sample")
        require(self.train_limit >= 0, self, "train_limit", "must be >= 0")
        require(self.valid_limit >= 0, self, "valid_limit", "must be >= 0")


@dataclass
class TrainSection(axon_training.TrainSection):
    """The shared `train` vocabulary (axon_shared.training) with the paper's values (section 5): Adam (0.9, 0.98,
    1e-9), the Noam schedule (eq. 3) with 4000 warm-up steps, no gradient clipping, no weight decay."""

    out_dir: str = "runs/transformer/cpu"
    steps: int = 100_000
    batch_size: int = 4096  # tokens per micro-batch: sentences * longest (source or target + 1) among them (section 5.1)
    lr: float | None = None  # the peak, reached at warmup_steps; null = the paper's d_model^-0.5 * warmup_steps^-0.5
    warmup_steps: int = 4000
    cooldown_steps: int = 0  # not in the paper: the lr ramps linearly to zero over the last N of `steps` (0 = eq. 3 alone)
    # not in the paper: an exponential moving average of the weights (decay per step; 0 = none), checkpointed beside them,
    # a running form of section 6.1's checkpoint averaging; `evaluate`/`translate`/`export --use_ema true` use it
    ema_decay: float = 0.0
    ema_warmup: bool = True  # decay_n = min(ema_decay, (1 + n) / (10 + n)): early on the average covers the last ~10% of steps
    grad_clip: float = 0.0  # the paper does not clip
    beta2: float = 0.98
    eps: float = 1e-9
    eval_every: int = 500  # steps between validation loss + BLEU
    checkpoint_every: int = 1000
    keep_last: int = 5
    log_every: int = 20
    eval_bleu_sentences: int = 200  # valid sentences translated (greedy) for the periodic BLEU

    def validate(self) -> None:
        super().validate()
        require(self.warmup_steps > 0, self, "warmup_steps", "must be > 0 (the Noam schedule divides by it)")
        require(self.eval_bleu_sentences >= 0, self, "eval_bleu_sentences", "must be >= 0")
        require(0 <= self.cooldown_steps <= self.steps, self, "cooldown_steps", f"must be in [0, steps={self.steps}] (0 = no cooldown)")
        require(0.0 <= self.ema_decay < 1.0, self, "ema_decay", "must be in [0, 1) (0 = no EMA; 0.998 averages over ~500 steps)")


@dataclass
class TrainConfig(AxonConfig):
    """`transformer train`: model + data + training."""

    model: TransformerConfig = field(default_factory=TransformerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "base": dict(
            model=TransformerConfig.PRESETS["base"],
            train=dict(
                out_dir="runs/transformer/base", batch_size=25000, warmup_steps=4000, steps=100_000, checkpoint_every=2000, eval_every=2000
            ),
        ),
        "big": dict(
            model=TransformerConfig.PRESETS["big"],
            train=dict(
                out_dir="runs/transformer/big", batch_size=25000, warmup_steps=4000, steps=300_000, checkpoint_every=2000, eval_every=2000
            ),
        ),
        "cpu": dict(
            model=TransformerConfig.PRESETS["cpu"],
            data=dict(valid_limit=500),
            # bf16 autocast doubles CPU throughput where the CPU has AVX512-BF16 (measured: 4,700 vs 2,400 target tokens/s
            # on 2 cores); peak lr 1.08e-3 = 0.3 * (256 * 300)^-0.5 (2e-3 diverged with post-norm); eval_every 500 ~ 5 min.
            train=dict(
                out_dir="runs/transformer/cpu",
                batch_size=2000,
                warmup_steps=300,
                lr=1.0825e-3,
                bf16=True,
                steps=100_000,
                eval_every=500,
                checkpoint_every=200,
                eval_bleu_sentences=200,
            ),
        ),
        "tiny": dict(
            model=TransformerConfig.PRESETS["tiny"] | dict(vocab_size=1000),
            data=dict(train_limit=2000, spm_sample=4000),
            train=dict(
                out_dir="runs/transformer/tiny",
                batch_size=1024,
                warmup_steps=50,
                steps=60,
                eval_every=30,
                checkpoint_every=30,
                eval_bleu_sentences=20,
                log_every=10,
            ),
        ),
    }

    def validate(self) -> None:
        require(self.model.max_len >= 8, self.model, "max_len", "must be >= 8")


@dataclass
class EvaluateConfig(AxonConfig):
    """`transformer evaluate`: sacreBLEU on a held-out split, greedy and beam."""

    run_dir: str = "runs/transformer/cpu"
    checkpoint: str = ""  # a .safetensors file; default: the latest in run_dir/checkpoints
    average_last: int = 1  # average the last N checkpoints (the paper: 5 for base)
    use_ema: bool = False  # the EMA weights of a run trained with train.ema_decay > 0 (false: the trained weights)
    split: str = "test"
    limit: int = 0  # evaluate the first N sentences only (0 = all)
    beam_size: int = 4
    alpha: float = 0.6
    greedy: bool = True  # also decode greedily
    batch_size: int = 64
    out: str = ""  # write a JSON with scores and signature here (default: run_dir/eval_<split>.json)
    device: str = "auto"

    def validate(self) -> None:
        require_choice(self, "split", ["train", "valid", "test"])
        require_positive(self, "average_last", "beam_size", "batch_size")
        require(self.limit >= 0, self, "limit", "must be >= 0")
        require(self.alpha >= 0, self, "alpha", "must be >= 0")


@dataclass
class TranslateConfig(AxonConfig):
    """`transformer translate`: text arguments or stdin lines, batched."""

    run_dir: str = "runs/transformer/cpu"
    checkpoint: str = ""
    average_last: int = 1
    use_ema: bool = False  # the EMA weights of a run trained with train.ema_decay > 0 (false: the trained weights)
    text: tuple[str, ...] = ()  # also given as positional arguments; empty: read stdin
    beam_size: int = 4
    alpha: float = 0.6
    batch_size: int = 64
    device: str = "auto"

    def validate(self) -> None:
        require_positive(self, "average_last", "beam_size", "batch_size")
        require(self.alpha >= 0, self, "alpha", "must be >= 0 (the length-penalty exponent; 0 = none)")


@dataclass
class AverageConfig(AxonConfig):
    """`transformer average`: write the mean of the last N checkpoints (section 6.1)."""

    run_dir: str = "runs/transformer/cpu"
    last: int = 5
    use_ema: bool = False  # the EMA weights of a run trained with train.ema_decay > 0 (false: the trained weights)
    out: str = ""  # default: run_dir/checkpoints/averaged.safetensors

    def validate(self) -> None:
        require_positive(self, "last")


@dataclass
class ExportConfig(AxonConfig):
    """`transformer export`: a run (its latest checkpoint, or the mean of its last N) as a Hugging Face directory
    (transformer.export): `marian` = save_pretrained of a transformers MarianMTModel + a MarianTokenizer."""

    run_dir: str = "runs/transformer/cpu"
    checkpoint: str = ""  # a .safetensors file; default: the latest in run_dir/checkpoints
    average_last: int = 1  # export the mean of the last N checkpoints (section 6.1)
    use_ema: bool = False  # the EMA weights of a run trained with train.ema_decay > 0 (false: the trained weights)
    format: str = "marian"
    out: str = ""  # default: run_dir/marian

    FORMATS: ClassVar[tuple[str, ...]] = ("marian",)

    def validate(self) -> None:
        require(self.format in self.FORMATS, self, "format", f"must be one of {list(self.FORMATS)}")
        require_positive(self, "average_last")


@dataclass
class DemoConfig(AxonConfig):
    """`transformer demo`: a few minutes of training on real data, then BLEU and example translations."""

    out_dir: str = "runs/demo/transformer"
    max_minutes: float = 2.5
    eval_sentences: int = 200

    def validate(self) -> None:
        require(self.max_minutes > 0, self, "max_minutes", "must be > 0")
        require_positive(self, "eval_sentences")
