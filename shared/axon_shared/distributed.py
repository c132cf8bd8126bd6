"""torch.distributed helpers so every train command also runs under `torchrun` (DDP; gloo on CPU, nccl on GPU).

Launched plainly, `setup_distributed()` returns a single-process context and nothing is initialised.
Under `torchrun --nproc-per-node N`, it reads RANK / WORLD_SIZE / LOCAL_RANK and joins the process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def set_threads(default: int = 0) -> None:
    """torch's CPU thread count from $AXON_THREADS (else `default`; 0 leaves torch's choice alone)."""
    threads = int(os.environ.get("AXON_THREADS", 0) or 0) or default
    if threads:
        torch.set_num_threads(threads)


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else cpu; anything else is passed to torch.device."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def setup_distributed(device: str = "auto") -> DistContext:
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistContext(device=pick_device(device))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = pick_device(device)
    if target.type == "cuda":
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistContext, *, fsdp: bool = False) -> nn.Module:
    """DDP (or FSDP2 `fully_shard` if fsdp=True) when distributed; the model itself otherwise."""
    if not ctx.is_distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        return model
    device_ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of `value` over all ranks (a copy; the input is left untouched)."""
    if not ctx.is_distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / ctx.world_size


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier()


def shard(items: list, ctx: DistContext) -> list:
    """This rank's share of a list (every world_size-th item, starting at rank)."""
    return items[ctx.rank :: ctx.world_size]
