"""Typed dataclass configs with named presets, loadable from dicts, YAML or TOML, validated field by field.

Every Axon config is a dataclass deriving from `AxonConfig`:

    @dataclass
    class ModelConfig(AxonConfig):
        dim: int = 64
        n_heads: int = 4
        PRESETS: ClassVar[dict] = {"tiny": dict(dim=32, n_heads=2)}

        def validate(self):
            require(self.dim % self.n_heads == 0, self, "dim", f"must be divisible by n_heads={self.n_heads}")

`ModelConfig.from_preset("tiny", dim=48)` starts from a preset and overrides fields. Construction always
validates (`__post_init__` -> `validate`), so a bad value fails at once with a `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml

from .errors import AxonError


class ConfigError(AxonError, ValueError):
    """A config value is invalid; the message names the class, the field, the value and what is allowed."""


def require(condition: bool, config: Any, field: str, message: str) -> None:
    """Raise ConfigError('Cls.field=value: message') unless condition holds."""
    if not condition:
        value = getattr(config, field, "<unset>")
        raise ConfigError(f"{type(config).__name__}.{field}={value!r}: {message}")


def require_positive(config: Any, *fields: str) -> None:
    for name in fields:
        require(getattr(config, name) > 0, config, name, "must be > 0")


def require_choice(config: Any, field: str, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    require(getattr(config, field) in choices, config, field, f"must be one of {choices}")


@dataclasses.dataclass
class AxonConfig:
    """Base class: presets, strict dict/file loading, validation on construction."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Override: call `require(...)` for every constraint."""

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Self:
        if name not in cls.PRESETS:
            raise ConfigError(f"{cls.__name__}: unknown preset {name!r}; available: {sorted(cls.PRESETS)}")
        return cls.from_dict(_deep_merge(cls.PRESETS[name], overrides))

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> Self:
        """A config read back from a checkpoint or config.json that an earlier version of the code wrote: fields
        this version no longer has are dropped (at every level), the rest is parsed and validated as usual."""
        return cls.from_dict(_known_fields(cls, values))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        """Build from a (nested) dict; unknown keys raise ConfigError listing the valid ones."""
        if not isinstance(values, dict):
            raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields: {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        kwargs = {name: _coerce(hints[name], value, f"{cls.__name__}.{name}") for name, value in values.items()}
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path, preset: str | None = None) -> Self:
        """Load a YAML (.yaml/.yml), TOML (.toml) or JSON file, optionally on top of a preset."""
        values = read_config_file(path)
        if preset is not None:
            return cls.from_preset(preset, **values)
        return cls.from_dict(values)

    def replace(self, **overrides: Any) -> Self:
        return type(self).from_dict(_deep_merge(self.to_dict(), overrides))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        values = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        values = yaml.safe_load(text) or {}
    elif path.suffix == ".json":
        values = json.loads(text)
    else:
        raise ConfigError(f"config file {path}: unsupported suffix {path.suffix!r}; use .yaml, .toml or .json")
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of field names to values")
    return values


def _known_fields(cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        return values
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    out = {}
    for name, value in values.items():
        if name in fields:
            hint = hints[name]
            nested = isinstance(hint, type) and dataclasses.is_dataclass(hint)
            out[name] = _known_fields(hint, value) if nested else value
    return out


def _deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Turn nested dicts into nested config dataclasses and lists into tuples where the type says so."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(options[0], value, where) if len(options) == 1 else value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {hint.__name__}, got {value!r}")
        return hint.from_dict(value) if issubclass(hint, AxonConfig) else hint(**value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
