"""Run under torchrun: one DDP step on this rank's half of a fixed batch; rank 0 saves the parameters."""

import sys

import torch

from axon_shared import cleanup_distributed, save_checkpoint, setup_distributed, wrap_model


def make_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    return model, x, y


def main(out_path: str) -> None:
    ctx = setup_distributed("cpu")
    model, x, y = make_problem()
    ddp = wrap_model(model, ctx)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    half = x.shape[0] // ctx.world_size
    rows = slice(ctx.rank * half, (ctx.rank + 1) * half)
    loss = torch.nn.functional.mse_loss(ddp(x[rows]), y[rows])
    loss.backward()
    optimizer.step()
    if ctx.is_main:
        save_checkpoint(out_path, model=ddp, step=1, config={"world_size": ctx.world_size}, rng=False)
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
