"""The training layer's domain errors. `lars.cli` (the application layer) turns each into one line
on stderr and an exit status; nothing below it knows about exit codes or argparse."""

from __future__ import annotations


class TrainingError(Exception):
    """Bad input found while setting up or running: reported on one line (exit status 2)."""


class SettingError(TrainingError, ValueError):
    """A setting (flag, config-file key) or combination that cannot work; names the flag."""


class DataError(TrainingError):
    """Data that cannot be read: a missing folder, an empty class, an unreadable image."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class ResumeError(TrainingError):
    """A checkpoint that cannot continue this run (unreadable, or made with another plan)."""


class BackendError(TrainingError, RuntimeError):
    """A distributed backend that is missing or cannot do what the settings ask."""


class RunStopped(Exception):
    """Training ended early on purpose, after the last good state was checkpointed."""


class Preempted(RunStopped):
    """A preemption signal reached some rank: every rank stopped after the same step."""


class NonFiniteAbort(RunStopped):
    """Too many non-finite steps in a row (`--nonfinite`, `--max-nonfinite`)."""
