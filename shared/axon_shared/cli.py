"""One CLI shape for every package: `<package> <command> [--preset NAME] [--config FILE] [--section.field VALUE ...]`.

Parsing (types, help, config files) is jsonargparse's; values are resolved in this order:
dataclass defaults < preset < config file < command-line flags. The result is validated by the config class,
so an invalid value exits with a `ConfigError` message naming the field.

    def train(cfg: TrainConfig) -> None: ...
    main = build_cli("x-llama", {"train": Command(train, TrainConfig, "Pretrain on en-text")})
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from .config import AxonConfig, ConfigError


@dataclasses.dataclass(frozen=True)
class Command:
    run: Callable[[Any], Any]
    config_class: type[AxonConfig]
    help: str = ""
    default_preset: str | None = None


def _preset_from(argv: Sequence[str]) -> str | None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    known, _ = pre.parse_known_args(argv)
    return known.preset


def parse_command(prog: str, command: Command, argv: Sequence[str]) -> AxonConfig:
    """Parse one command's arguments into its validated config."""
    cls = command.config_class
    preset = _preset_from(argv) or command.default_preset
    try:
        default = cls.from_preset(preset) if preset else cls()
    except ConfigError as error:
        raise SystemExit(f"{prog}: error: {error}") from None
    parser = ArgumentParser(prog=prog, description=command.help, exit_on_error=True)
    preset_choices = {"choices": sorted(cls.PRESETS)} if cls.PRESETS else {}
    parser.add_argument("--preset", default=preset, help="named starting configuration (the other flags override it)", **preset_choices)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML/TOML/JSON file of overrides")
    parser.add_class_arguments(cls, nested_key=None, default=default)
    try:
        namespace = parser.parse_args(list(argv)).as_dict()
        values = {name: namespace[name] for name in (f.name for f in dataclasses.fields(cls) if f.init)}
        return cls.from_dict(values)
    except ConfigError as error:
        raise SystemExit(f"{prog}: error: {error}") from None


def build_cli(prog: str, commands: dict[str, Command], description: str = "") -> Callable[[Sequence[str] | None], Any]:
    """Return `main(argv=None)` dispatching `prog <command> ...` to the command's run(config)."""

    def main(argv: Sequence[str] | None = None) -> Any:
        """Programmatic calls (argv given) get the command's return value; as a console script (argv None) it
        returns None, since `sys.exit(value)` would print a non-None value and exit with status 1."""
        from_console = argv is None
        argv = list(sys.argv[1:] if argv is None else argv)
        if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
            lines = [description or prog, "", f"usage: {prog} <command> [--preset NAME] [--config FILE] [--SECTION.FIELD VALUE ...]", "", "commands:"]
            lines += [f"  {name:<10} {cmd.help}" for name, cmd in commands.items()]
            print("\n".join(lines))
            if argv and argv[0] not in ("-h", "--help"):
                raise SystemExit(f"{prog}: error: unknown command {argv[0]!r}; choose from {sorted(commands)}")
            return None
        command = commands[argv[0]]
        config = parse_command(f"{prog} {argv[0]}", command, argv[1:])
        result = command.run(config)
        return None if from_console else result

    return main
