"""`transformer train`: section 5 of the paper on an offline parallel corpus, through the one training loop
(axon_shared.training).

Adam (0.9, 0.98, 1e-9) with the Noam schedule (eq. 3), label smoothing 0.1 (section 5.4), batches of about
`train.batch_size` tokens grouped by length (section 5.1), gradient accumulation in which every target token of the
step weighs the same, DDP under torchrun, exact resume from the latest checkpoint in out_dir. Two deviations, both off
by default: a linear cooldown of the lr (`train.cooldown_steps`) and an EMA of the weights (`train.ema_decay`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from axon_shared.ema import EMA
from axon_shared.training import Trainer, count_parameters

from .config import TrainConfig, TransformerConfig
from .data import BucketedBatches, Example, build_tokenizer, collate, encode_pairs, load_pairs, pad
from .decoding import greedy_decode
from .inference import TOKENIZER_FILE, bleu
from .loss import label_smoothed_loss
from .model import Transformer


@dataclass(frozen=True)
class NoamSchedule:
    """lrate = factor * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)  (Vaswani et al. 2017, eq. 3).

    Linear warm-up for `warmup` steps, then decay with the inverse square root of the step; the peak, reached at
    step = warmup, is factor * (d_model * warmup)^-0.5. Steps count from 1.

    Deviation (off by default, `cooldown` = 0): over the last `cooldown` of `total` steps, eq. 3 is multiplied by
    (total - step + 1) / cooldown, a linear ramp to zero, the "cooldown" of warmup-stable-decay schedules (Hagele et
    al. 2024). Eq. 3 alone never anneals: at step s it is still sqrt(warmup / s) of the peak (0.3 at the end of the `cpu`
    preset's 30 minutes without a cooldown)."""

    d_model: int
    warmup: int = 4000
    factor: float = 1.0
    total: int = 0
    cooldown: int = 0

    def __post_init__(self) -> None:
        if self.cooldown and not 0 < self.cooldown <= self.total:
            raise ValueError(f"NoamSchedule: cooldown={self.cooldown} must be in [1, total={self.total}] (or 0 for none)")

    def __call__(self, step: int) -> float:
        step = max(step, 1)
        lrate = self.factor * self.d_model**-0.5 * min(step**-0.5, step * self.warmup**-1.5)
        if self.cooldown:
            lrate *= min(1.0, max(0, self.total - step + 1) / self.cooldown)
        return lrate

    @classmethod
    def with_peak(cls, d_model: int, warmup: int, peak: float | None, total: int = 0, cooldown: int = 0) -> NoamSchedule:
        """The schedule whose peak is `peak` (None: the paper's, factor 1)."""
        return cls(d_model, warmup, 1.0 if peak is None else peak * (d_model * warmup) ** 0.5, total, cooldown)


def token_loss(model: Transformer, batch: tuple[Tensor, Tensor, Tensor], config: TransformerConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """The micro-batch's *sum* of label-smoothed token losses (and of plain NLLs); the loop divides by the step's
    target tokens on all ranks (`target_tokens`), so each token weighs the same however the step is split."""
    src, tgt_in, tgt_out = batch
    smoothed, nll, _ = label_smoothed_loss(model(src, tgt_in), tgt_out, epsilon=config.label_smoothing, pad_id=config.pad_id)
    return smoothed, {"nll": nll.detach()}


def target_tokens(batch: tuple[Tensor, Tensor, Tensor], pad_id: int) -> int:
    return int((batch[2] != pad_id).sum())


@torch.no_grad()
def validate(
    model: Transformer, examples: list[Example], tokenizer, references: list[str], *, max_tokens: int, bleu_sentences: int
) -> dict[str, float]:
    """Validation loss (plain NLL and label-smoothed, per target token) on all examples, greedy BLEU on a sample."""
    cfg = model.config
    device = model.embedding.weight.device
    totals = torch.zeros(3, dtype=torch.float64)
    order = sorted(range(len(examples)), key=lambda i: examples[i].size)
    start = 0
    while start < len(order):
        rows = [order[start]]
        while start + len(rows) < len(order) and examples[order[start + len(rows)]].size * (len(rows) + 1) <= max_tokens:
            rows.append(order[start + len(rows)])
        start += len(rows)
        src, tgt_in, tgt_out = (t.to(device) for t in collate([examples[i] for i in rows], cfg))
        smoothed, nll, n = label_smoothed_loss(model(src, tgt_in), tgt_out, epsilon=cfg.label_smoothing, pad_id=cfg.pad_id)
        totals += torch.tensor([smoothed.item(), nll.item(), n.item()], dtype=torch.float64)
    out = {"loss": totals[0].item() / totals[2].item(), "nll": totals[1].item() / totals[2].item()}
    out["ppl"] = math.exp(min(out["nll"], 50))
    if bleu_sentences:
        sample = examples[:bleu_sentences]
        hyps: list[str] = []
        for i in range(0, len(sample), 64):
            src = pad([e.src for e in sample[i : i + 64]], cfg.pad_id).to(device)
            hyps += [tokenizer.decode(t) for t in greedy_decode(model, src)]
        out["bleu"], _ = bleu(hyps, references[: len(sample)])
    return out


def train(config: TrainConfig) -> dict[str, float]:
    """Train (or resume) the run in config.train.out_dir; returns the last metrics."""
    tc, mc = config.train, config.model
    with Trainer(tc, config, name="transformer") as trainer:
        # ---- data: the joint BPE (trained once by rank 0), token ids, length-bucketed micro-batches -------------
        train_pairs = load_pairs(config.data, "train")
        valid_pairs = load_pairs(config.data, "valid")
        with trainer.main_first():
            tokenizer = build_tokenizer(train_pairs, trainer.out_dir / TOKENIZER_FILE, mc, config.data.spm_sample, tc.seed)
        train_examples = encode_pairs(tokenizer, train_pairs, mc.max_len)
        valid_examples = encode_pairs(tokenizer, valid_pairs, mc.max_len, drop_long=False)
        batches = BucketedBatches(train_examples, tc.batch_size, tc.seed, rank=trainer.ctx.rank, world_size=trainer.ctx.world_size)
        model = Transformer(mc)
        if trainer.is_main:
            print(
                f"transformer: {count_parameters(model):,} parameters; {len(train_examples):,} training pairs "
                f"({len(train_pairs) - len(train_examples)} longer than max_len dropped), {batches.per_epoch:,} micro-batches "
                f"per epoch and rank; {'resuming at step ' + str(trainer.start_step) if trainer.start_step else 'new run'} in {trainer.out_dir}"
            )

        def batch(step: int, micro: int) -> tuple[Tensor, Tensor, Tensor]:
            return tuple(t.to(trainer.device) for t in collate(batches(step * tc.grad_accum + micro), mc))

        # not in the paper: the EMA of the weights (train.ema_decay > 0), a running form of checkpoint averaging (6.1)
        ema = EMA(model.to(trainer.device), tc.ema_decay, warmup=tc.ema_warmup) if tc.ema_decay > 0 else None  # shadows on the device

        def evaluate(model: Transformer, step: int) -> dict[str, float]:
            def scores() -> dict[str, float]:
                return validate(
                    model,
                    valid_examples,
                    tokenizer,
                    [t for _, t in valid_pairs],
                    max_tokens=tc.batch_size * 2,
                    bleu_sentences=tc.eval_bleu_sentences,
                )

            metrics = scores()
            if ema is not None:
                with ema.applied_to(model):
                    metrics |= {f"{name}_ema": value for name, value in scores().items()}
            return metrics

        schedule = NoamSchedule.with_peak(mc.d_model, tc.warmup_steps, tc.lr, tc.steps, tc.cooldown_steps)
        return trainer.fit(
            model,
            loss=lambda model, b: token_loss(model, b, mc),
            batch=batch,
            evaluate=evaluate,
            ema=ema,
            schedule=lambda step: schedule(step + 1),
            weight=lambda b: target_tokens(b, mc.pad_id),
            count=lambda b: target_tokens(b, mc.pad_id),
            unit="tokens",
            plots={
                "loss.png": ("train/nll", "valid/nll") + (("valid/nll_ema",) if ema else ()),
                "bleu.png": ("valid/bleu",) + (("valid/bleu_ema",) if ema else ()),
                "lr.png": ("lr", "tokens_per_s"),
            },
        )
