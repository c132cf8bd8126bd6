"""`train.compile`: every package's training loss (the model call and the loss) compiles to one graph
(`torch.compile(fullgraph=True)`, the engine's setting) and trains as the eager code does: the first steps' losses
of each `tiny` preset equal the eager ones recorded in tests/regression/tiny_losses.json, to float32 rounding
(compiled kernels sum in another order, and inside the graph attention runs as explicit matmuls)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch.testing import assert_close

from axon_shared.config import ConfigError
from axon_shared.metrics import read_metrics

RECORDED = json.loads((Path(__file__).parent / "regression" / "tiny_losses.json").read_text())["losses"]
STEPS = 2
COMPILED = dict(steps=STEPS, compile=True, log_every=1, eval_every=1000, checkpoint_every=1000, progress=False)


def losses(run: Path) -> list[float]:
    return [row["train/loss"] for row in read_metrics(run / "metrics.jsonl") if "train/loss" in row]


def test_x_llama_compiled(tmp_path):
    from x_llama.config import TrainConfig
    from x_llama.train import train

    train(TrainConfig.from_preset("tiny", train=dict(out_dir=str(tmp_path), **COMPILED)))
    assert_close(losses(tmp_path), RECORDED["x_llama"][:STEPS], rtol=1e-5, atol=0)


def test_transformer_compiled(tmp_path):
    """Dropout off on both sides: a compiled graph draws its dropout masks from inductor's generator, not eager's."""
    from transformer.config import TrainConfig
    from transformer.train import train

    runs = {}
    for compiled in (False, True):
        runs[compiled] = tmp_path / str(compiled)
        train(
            TrainConfig.from_preset(
                "tiny", model=dict(dropout=0.0), train=dict(out_dir=str(runs[compiled]), **COMPILED | dict(compile=compiled))
            )
        )
    assert_close(losses(runs[True]), losses(runs[False]), rtol=1e-5, atol=0)


def test_dali_ddpm_compiled(tmp_path):
    """The loss draws t and the noise inside the graph: with fallback_random the compiled graph draws them from
    torch's generator as eager code does, so the numbers are comparable."""
    import torch._inductor.config

    from dali_ddpm.config import DDPMConfig
    from dali_ddpm.train import train

    # inductor's own patch context (pytest's monkeypatch deletes the option on undo: the config module has no
    # such attribute, only a __getattr__, and later compiles then fail on the missing option)
    with torch._inductor.config.patch(fallback_random=True):
        train(DDPMConfig.from_preset("tiny", train=dict(out_dir=str(tmp_path), sample_every=1000, **COMPILED)))
    assert_close(losses(tmp_path), RECORDED["dali_ddpm"][:STEPS], rtol=1e-5, atol=0)


def test_dpo_loss_compiled():
    """instructgpt_rlhf's DPO step (`batch_logprobs` of the [chosen; rejected] batch, then `dpo_loss`, what
    `run_dpo`'s loss runs) compiles to one graph and gives the eager loss and gradients. (SFT, the reward model and
    PPO train with the same x_llama forward; their tiny runs are covered by the regression test in eager mode.)"""
    import torch

    from instructgpt_rlhf.dpo import batch_logprobs, pair_batch
    from instructgpt_rlhf.losses import dpo_loss
    from x_llama import Llama, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig.from_preset("tiny")
    policy, reference = Llama(config), Llama(config).eval()
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, config.vocab_size, (n,), generator=gen).tolist()

    pairs = [([1, *ids(3 + i)], ids(5 + 2 * i), ids(9 - i)) for i in range(4)]
    batch = pair_batch(pairs)
    with torch.no_grad():
        ref_chosen, ref_rejected = batch_logprobs(reference, batch)
    lengths = [torch.tensor([len(pair[which]) for pair in pairs]) for which in (1, 2)]

    def loss(model, batch):
        chosen, rejected = batch_logprobs(model, batch)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1, chosen_lengths=lengths[0], rejected_lengths=lengths[1])[0]

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        policy.zero_grad()
        value = fn(policy, batch)
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in policy.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads):
        assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_loss_that_breaks_the_graph_is_a_clear_error(tmp_path):
    import dataclasses

    import torch

    from axon_shared.config import AxonConfig
    from axon_shared.training import Trainer, TrainSection

    @dataclasses.dataclass
    class Toy(AxonConfig):
        train: TrainSection = dataclasses.field(default_factory=TrainSection)

    cfg = Toy(train=TrainSection(out_dir=str(tmp_path), steps=1, compile=True, progress=False))

    def loss(model, rows):
        value = (model(rows[:, :4]) - rows[:, 4:]).pow(2).mean()
        if float(value) > 0:  # reads a value back inside the loss: a graph break
            value = value * 1.0
        return value, {}

    with (
        Trainer(cfg.train, cfg, name="toy") as trainer,
        pytest.raises(ConfigError, match="does not compile to one graph.*set compile false"),
    ):
        trainer.fit(torch.nn.Linear(4, 1), loss=loss, batch=lambda step, micro: torch.ones(2, 5))
