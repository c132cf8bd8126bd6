"""The project's error types. Every error a user can cause derives from `AxonError`, so the CLI shows it as one
line naming the problem and its fix (and `--debug` shows the traceback)."""

from __future__ import annotations


class AxonError(Exception):
    """Base class: a problem the user can fix (bad input, a missing file, a run in use); the message says how."""


class RunLockedError(AxonError):
    """Another process is training in the same run directory."""


class ConfigMismatchError(AxonError):
    """A run is resumed with a config whose frozen fields (the model's shape) differ from its checkpoints'."""


class Interrupted(AxonError):
    """Training stopped on SIGINT / SIGTERM after saving a checkpoint; the same command resumes it."""

    def __init__(self, message: str, signal_number: int, step: int):
        super().__init__(message)
        self.signal_number, self.step = signal_number, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM
