"""Checkpoints: one safetensors file holding every tensor, with the JSON state in its header.

A checkpoint file holds
- tensors under prefixes: `model/...`, `optimizer/...`, `ema/...`, `rng/...` and any extra `<name>/...`;
- header metadata `axon` = JSON {format, step, config, metrics, optimizer (non-tensor state), rng, extra}.

Writing is atomic: the file is written to a temporary name in the same folder, fsync'ed, then renamed over the
target, so a crash mid-write leaves the previous checkpoint intact. Loading parses safetensors + JSON only:
nothing is unpickled, so a checkpoint can never run code. A truncated or corrupted file raises CheckpointError.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import AxonError
from .seed import capture_rng_state, restore_rng_state

FORMAT = "axon-checkpoint-v1"


class CheckpointError(AxonError, RuntimeError):
    """The checkpoint is missing, truncated, corrupted, or does not fit the model."""


@dataclass
class Checkpoint:
    """What `load_checkpoint` returns: tensors grouped by prefix and the JSON state."""

    path: Path
    step: int
    config: dict[str, Any]
    metrics: dict[str, Any]
    extra: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]] = field(repr=False)
    state: dict[str, Any] = field(repr=False)

    def model_config(self, config_class: type, section: str = "model") -> Any:
        """The model config saved with this checkpoint as a `config_class`. Fields that this version of the code no
        longer has are ignored (`AxonConfig.from_saved`); a section whose fields are mostly unknown belongs to another
        model (e.g. a dali_ddpm run passed to x-llama) and raises a CheckpointError, not a KeyError."""
        import dataclasses

        values = self.config.get(section)
        known = {f.name for f in dataclasses.fields(config_class)}
        if not isinstance(values, dict) or len(known & set(values)) * 2 < len(values):
            fields = sorted(values) if isinstance(values, dict) else "none"
            raise CheckpointError(
                f"{self.path}: not a checkpoint of a {config_class.__name__} model (its {section!r} fields: {fields}); "
                "pass a run of the right package"
            )
        try:
            return config_class.from_saved(values)
        except (ValueError, TypeError) as error:  # an invalid saved config (ConfigError is a ValueError): say which file
            raise CheckpointError(f"{self.path}: its {section!r} config does not load ({error})") from None

    def restore(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        ema: Any | None = None,
        *,
        rng: bool = True,
        strict: bool = True,
    ) -> int:
        """Load the parts given into the live objects (and the RNG states); return the step."""
        if model is not None:
            load_model_state(_unwrap(model), self.tensors.get("model", {}), strict=strict, source=self.path)
        if optimizer is not None:
            if "optimizer" not in self.state:
                raise CheckpointError(f"{self.path}: holds no optimizer state (saved for inference only?)")
            optimizer.load_state_dict(_unflatten_optimizer(self.tensors.get("optimizer", {}), self.state["optimizer"]))
        if ema is not None:
            ema.load_state_dict(self.tensors.get("ema", {}))
        if rng and "rng" in self.state:
            restore_rng_state(self.tensors.get("rng", {}), self.state["rng"])
        return self.step


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module | dict[str, torch.Tensor],
    step: int = 0,
    config: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | dict[str, Any] | None = None,
    ema: Any | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    rng: bool = True,
) -> Path:
    """Write a checkpoint atomically and return its path. `model` and `optimizer` may also be state dicts (the
    whole tensors gathered from FSDP shards)."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {
        "format": FORMAT,
        "step": int(step),
        "config": config or {},
        "metrics": metrics or {},
        "extra": extra or {},
    }
    _add(tensors, "model", model if isinstance(model, dict) else _unwrap(model).state_dict())
    if optimizer is not None:
        optim_tensors, state["optimizer"] = _flatten_optimizer(optimizer if isinstance(optimizer, dict) else optimizer.state_dict())
        _add(tensors, "optimizer", optim_tensors)
    if ema is not None:
        _add(tensors, "ema", ema.state_dict())
    if rng:
        rng_tensors, state["rng"] = capture_rng_state()
        _add(tensors, "rng", rng_tensors)
    for prefix, group in (extra_tensors or {}).items():
        if prefix in ("model", "optimizer", "ema", "rng"):
            raise ValueError(f"extra_tensors prefix {prefix!r} is reserved")
        _add(tensors, prefix, group)
    _atomic_save(tensors, {"axon": json.dumps(state)}, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; check the path, or train first to create one")
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as handle:
            metadata = handle.metadata() or {}
            grouped: dict[str, dict[str, torch.Tensor]] = {}
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                prefix, _, name = key.partition("/")
                grouped.setdefault(prefix, {})[name] = handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: corrupted or truncated checkpoint ({error}); delete it and resume from an earlier one") from error
    try:
        state = json.loads(metadata["axon"])
    except (KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not an Axon checkpoint (missing or unreadable 'axon' header)") from error
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {state.get('format')!r}, expected {FORMAT!r}")
    return Checkpoint(
        path=path,
        step=state["step"],
        config=state["config"],
        metrics=state["metrics"],
        extra=state["extra"],
        tensors=grouped,
        state=state,
    )


def load_model_state(model: nn.Module, tensors: dict[str, torch.Tensor], *, strict: bool = True, source: Any = "") -> None:
    """load_state_dict with a readable error on missing, unexpected or mis-shaped keys."""
    own = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in tensors.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise CheckpointError(f"{source}: tensor shapes do not fit the model (wrong config?): {mismatched[:5]}")
    result = model.load_state_dict(tensors, strict=False)
    unexpected = list(result.unexpected_keys)
    missing = list(result.missing_keys)
    if strict and (missing or unexpected):
        raise CheckpointError(f"{source}: checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


CHECKPOINT_NAME = re.compile(r"step_(\d+)\.safetensors")


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.safetensors"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The step_*.safetensors files in `directory`, oldest (lowest step) first; [] if there are none."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint with the highest step number in `directory`, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def prune_checkpoints(directory: str | Path, keep_last: int) -> None:
    """Delete all but the `keep_last` newest step_*.safetensors files."""
    found = list_checkpoints(directory)
    for stale in found[: max(0, len(found) - keep_last)]:
        stale.unlink(missing_ok=True)


def remove_partial_writes(directory: str | Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that a crash interrupted (`.step_*.tmp`); return them.
    Call it only while holding the run's lock (a live writer's temporary file would be deleted too)."""
    directory = Path(directory)
    stale = sorted(directory.glob(".step_*.tmp")) if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def run_checkpoints(path: str | Path, *, last: int = 1, name: str | None = None) -> tuple[Path, list[Path]]:
    """The one run loader's first half: (run directory, checkpoint files, oldest first) for what a user passes.

    - a run directory: its newest `last` checkpoints in <run>/checkpoints (or, with `name`, the file <run>/<name>,
      a stage's final model such as instructgpt_rlhf's policy.safetensors);
    - a checkpoint file: that file; its run directory is the folder holding `checkpoints/`.
    """
    path = Path(path)
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return run_dir, [path]
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist; pass a run directory (the --train.out_dir of a training run) or a checkpoint file")
    if name is not None:
        if not (path / name).is_file():
            raise CheckpointError(f"no {name} in {path}; run the stage that writes it first (it is written when training ends)")
        return path, [path / name]
    found = list_checkpoints(path / "checkpoints")
    if not found:
        raise CheckpointError(f"no checkpoints in {path / 'checkpoints'}; train first (with --train.out_dir {path})")
    return path, found[-last:]


def average_checkpoints(paths: list[str | Path], part: str = "model") -> dict[str, torch.Tensor]:
    """Element-wise mean of the model tensors of several checkpoints (Vaswani et al. 6.1), accumulated in float64.
    part="ema": the mean of their EMA weights instead."""
    if not paths:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path in paths:
        model = load_checkpoint(path).tensors.get(part, {})
        if not model:
            raise CheckpointError(f"{path} holds no '{part}' tensors; cannot average them")
        if total and set(model) != set(total):
            raise CheckpointError(f"{path}: its tensors differ from the first checkpoint's; cannot average")
        for name, tensor in model.items():
            total[name] = total.get(name, 0) + tensor.double()
            dtypes[name] = tensor.dtype
    return {name: (t / len(paths)).to(dtypes[name]) for name, t in total.items()}


# ---- internals ----------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _add(tensors: dict[str, torch.Tensor], prefix: str, group: dict[str, torch.Tensor]) -> None:
    for name, tensor in group.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{prefix}/{name} is {type(tensor).__name__}, not a tensor")
        tensors[f"{prefix}/{name}"] = tensor.detach().contiguous().cpu()


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # de-alias: safetensors rejects tensors sharing memory
    unique: dict[str, torch.Tensor] = {}
    pointers: set[tuple[int, int]] = set()
    for name, tensor in tensors.items():
        ident = (tensor.data_ptr(), tensor.numel())
        if tensor.numel() and ident in pointers:
            tensor = tensor.clone()
        pointers.add((tensor.data_ptr(), tensor.numel()))
        unique[name] = tensor
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(unique, tmp_name, metadata=metadata)
        with open(tmp_name, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{name}"] = value
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        param_id, _, name = key.partition(".")
        state.setdefault(int(param_id), {})[name] = tensor
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}
