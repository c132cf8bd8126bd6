"""One CLI shape for every package: `<package> <command> [--preset NAME] [--config FILE] [--section.field VALUE ...]`.

A package's `cli.py` is a table of commands, each naming its function and config class lazily as "module:name"
(so `--help` imports nothing heavy):

    main = build_cli("x-llama", {
        "train": Command("x_llama.train:train", "x_llama.config:TrainConfig", "pretrain on en-text", default_preset="cpu"),
    })

Parsing (types, help, config files) is jsonargparse's; values are resolved in this order: dataclass defaults <
preset < config file < command-line flags, and the config class validates the result. The project's errors
(`AxonError`: bad values, missing or damaged files, a run in use) and the operating system's (`OSError`: no
permission, disk full) reach the user as one line and a non-zero exit status; `--debug` shows the traceback.
`main(argv)` called from Python returns the command's result.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from .config import AxonConfig, ConfigError
from .distributed import set_threads
from .errors import AxonError, Interrupted


@dataclasses.dataclass(frozen=True)
class Command:
    target: str | Callable[[Any], Any]  # "package.module:function" (or the function), called with the parsed config
    config: str | type[AxonConfig]  # "package.module:ConfigClass" (or the class)
    help: str = ""
    default_preset: str | None = None
    positional: str | None = None  # a tuple[str, ...] config field that takes the positional arguments (texts)

    def function(self) -> Callable[[Any], Any]:
        return _resolve(self.target)

    def config_class(self) -> type[AxonConfig]:
        return _resolve(self.config)


def _resolve(reference: str | Any) -> Any:
    if not isinstance(reference, str):
        return reference
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def parse_command(prog: str, command: Command, argv: Sequence[str]) -> AxonConfig:
    """Parse one command's arguments into its validated config (SystemExit with a message naming the field)."""
    cls = command.config_class()
    argv, texts = _split_positional(list(argv)) if command.positional else (list(argv), [])
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    preset = pre.parse_known_args(argv)[0].preset or command.default_preset
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
        namespace = parser.parse_args(argv).as_dict()
        values = {name: namespace[name] for name in (f.name for f in dataclasses.fields(cls) if f.init)}
        if texts:  # passed through untouched: no re-encoding on the way to the config
            values[command.positional] = tuple(texts)
        return cls.from_dict(values)
    except ConfigError as error:
        raise SystemExit(f"{prog}: error: {error}") from None


def _split_positional(argv: list[str]) -> tuple[list[str], list[str]]:
    """(options, positional texts): every `--flag` takes the next argument as its value (or `--flag=value`);
    everything after a bare `--` is text even if it starts with a dash."""
    options, texts, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            texts += argv[i + 1 :]
            break
        if arg.startswith("--") or arg == "-h":
            options.append(arg)
            if "=" not in arg and arg not in ("--help", "-h") and i + 1 < len(argv):
                options.append(argv[i + 1])
                i += 1
        else:
            texts.append(arg)
        i += 1
    return options, texts


def build_cli(prog: str, commands: dict[str, Command], description: str = "") -> Callable[[Sequence[str] | None], Any]:
    """Return `main(argv=None)` dispatching `prog <command> ...` to the command's function."""

    def main(argv: Sequence[str] | None = None) -> Any:
        """As a console script (argv None) it returns None: `sys.exit(value)` would print a non-None value and
        exit with status 1. Called with argv it returns the command's result."""
        from_console = argv is None
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = "--debug" in argv
        argv = [a for a in argv if a != "--debug"]
        if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
            lines = [
                description or prog,
                "",
                f"usage: {prog} <command> [--preset NAME] [--config FILE] [--SECTION.FIELD VALUE ...] [--debug]",
                "",
                "commands:",
            ]
            lines += [f"  {name:<10} {cmd.help}" for name, cmd in commands.items()]
            print("\n".join(lines))
            if argv and argv[0] not in ("-h", "--help"):
                raise SystemExit(f"{prog}: error: unknown command {argv[0]!r}; choose from {sorted(commands)}")
            return None
        name, command = argv[0], commands[argv[0]]
        where = f"{prog} {name}"
        config = parse_command(where, command, argv[1:])
        set_threads()  # torch's CPU threads from $AXON_THREADS
        try:
            result = command.function()(config)
        except Interrupted as stop:
            if debug:
                raise
            print(f"{where}: {stop}", file=sys.stderr)
            raise SystemExit(stop.exit_code) from None
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"{where}: interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except (AxonError, OSError) as error:
            if debug:
                raise
            message = str(error) if not isinstance(error, OSError) or not error.filename else f"{error.strerror}: {error.filename}"
            raise SystemExit(f"{where}: error: {message} (--debug shows the traceback)") from None
        return None if from_console else result

    return main


def text_argument(text: str | None, what: str = "text") -> str:
    """A text given on the command line (or, when None, read from stdin), as valid Unicode.

    Arguments and stdin that are not valid UTF-8 (Python keeps such argv bytes as lone surrogates) would otherwise
    reach the tokenizer and fail there with an unreadable message: undecodable bytes become U+FFFD, with a warning."""
    if text is None:
        raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8", "surrogateescape")
    else:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
            raw = text.encode("utf-8", "replace")
    decoded = raw.decode("utf-8", errors="replace")
    if decoded.count("\ufffd") > raw.count("\ufffd".encode()):
        print(f"warning: the {what} is not valid UTF-8; undecodable bytes were replaced by U+FFFD", file=sys.stderr)
    return decoded
