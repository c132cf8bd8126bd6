"""torch.distributed helpers so every train command also runs under `torchrun` (DDP; gloo on CPU, nccl on GPU).

Launched plainly, `setup_distributed()` returns a single-process context and nothing is initialised.
Under `torchrun --nproc-per-node N`, it reads RANK / WORLD_SIZE / LOCAL_RANK and joins the process group.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 (an immutable value)

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
    """'auto' -> cuda if available, else cpu; anything else is passed to torch.device and checked now (not at the
    first tensor moved there), with an error naming the fix."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"device={requested!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(
            f"device={requested!r}: this machine has {torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA device(s); use auto or cpu"
        )
    return device


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


def wrap_model(model: nn.Module, ctx: DistContext, *, fsdp: bool = False, blocks: Iterable[nn.Module] | None = None) -> nn.Module:
    """DDP when distributed (the model itself otherwise); with fsdp=True, FSDP2: `fully_shard` on every block,
    then on the root for what is left (embeddings, final norm, head).

    Sharding each block is what makes FSDP save memory: a block's parameters are gathered just before its forward
    (and backward) and freed after, so at most one block is whole at a time. Sharding only the root would gather
    the whole model for every forward, which needs as much memory as DDP."""
    if not ctx.is_distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        if blocks is None:
            raise ValueError("FSDP needs the model's blocks (the units to shard); this model does not name them")
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    device_ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank if `flag` is True on any rank: how all ranks agree to stop at the same step (a rank that
    stopped alone would leave the others waiting forever in the next collective)."""
    if not ctx.is_distributed:
        return flag
    value = torch.tensor(float(flag), device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_to_main(obj: Any, ctx: DistContext) -> list[Any] | None:
    """Every rank's `obj` as a list on rank 0 (None on the others)."""
    if not ctx.is_distributed:
        return [obj]
    out = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's `obj` on every rank."""
    if not ctx.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts with whole tensors on rank 0 gathered from FSDP shards (a collective: every
    rank calls it; ranks > 0 get empty dicts). The optimizer's is keyed by parameter index like a plain one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    full = get_optimizer_state_dict(model, optimizer, options=options)  # keyed by parameter name
    if "state" not in full:  # ranks > 0 (cpu_offload keeps the full copy on rank 0)
        return {}, {}
    index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    plain = {
        "state": {index[name]: value for name, value in full["state"].items()},
        "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in full["param_groups"]],
    }
    return model_state, plain


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, plain: dict) -> None:
    """Load a plain (index-keyed, whole-tensor) optimizer state dict into an optimizer over FSDP-sharded parameters."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _parameter_names(model, optimizer)
    full = {
        "state": {names[int(i)]: value for i, value in plain["state"].items()},
        "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]} for group in plain["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order (the integer ids of a plain optimizer state dict)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Element-wise sum of `values` over all ranks (a CPU copy; the communication runs on the rank's device, as
    nccl needs)."""
    if not ctx.is_distributed:
        return values
    on_device = values.detach().to(ctx.device, copy=True)
    dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
    return on_device.cpu()


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier()
