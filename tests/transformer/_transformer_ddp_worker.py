"""Run under torchrun (2 ranks): accumulate_gradients over this rank's 2 micro-batches; rank 0 saves the grads."""

import sys

import torch
from axon_shared import cleanup_distributed, save_checkpoint, setup_distributed, wrap_model

from transformer import Transformer, TransformerConfig
from transformer.data import Example, collate
from transformer.train import accumulate_gradients


def make_problem():
    """A tiny model and 4 micro-batches with very different target token counts."""
    cfg = TransformerConfig(vocab_size=30, d_model=32, n_heads=4, n_encoder_layers=1, n_decoder_layers=1, d_ff=64, dropout=0.0, max_len=32)
    torch.manual_seed(0)
    model = Transformer(cfg)
    gen = torch.Generator().manual_seed(1)
    shapes = [[(3, 9), (5, 2)], [(7, 1)], [(2, 3), (4, 8), (6, 6)], [(5, 12)]]
    micro = [collate([Example(torch.randint(4, 30, (n,), generator=gen).tolist() + [2], torch.randint(4, 30, (m,), generator=gen).tolist())
                      for n, m in group], cfg) for group in shapes]
    return cfg, model, micro


def main(out_path: str) -> None:
    ctx = setup_distributed("cpu")
    cfg, model, micro = make_problem()
    ddp = wrap_model(model, ctx)
    accumulate_gradients(ddp, micro[2 * ctx.rank : 2 * ctx.rank + 2], cfg, ctx)
    if ctx.is_main:
        grads = {name: p.grad for name, p in model.named_parameters()}
        save_checkpoint(out_path, model=model, extra_tensors={"grad": grads}, rng=False)
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
