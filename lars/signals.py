"""Preemption signals, recorded from the first line of the entry script on (no torch import).

SLURM (`--signal`, a time limit, preemption, `scancel`) or an operator sends SIGTERM or SIGUSR1.
The handler only records the request; the training loop (see `lars.faults.StopAgreement`) makes
every rank stop after the same step, checkpoint and exit with `REQUEUE_EXIT_STATUS`.

`install_preemption_handler()` is process-wide and idempotent: the entry script installs it
before the heavy imports, so a signal during start-up is recorded instead of killing the rank,
and the trainer later gets the same handler (and whatever it already received).
"""

from __future__ import annotations

import os
import signal

REQUEUE_EXIT_STATUS = 3  # preempted: checkpoint written, run again to resume
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

__all__ = [
    "PREEMPTION_SIGNALS",
    "REQUEUE_EXIT_STATUS",
    "PreemptionHandler",
    "install_preemption_handler",
]


class PreemptionHandler:
    """Records SIGTERM/SIGUSR1; the second one exits the process immediately."""

    def __init__(self, signals=PREEMPTION_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous = {}

    def install(self) -> PreemptionHandler:
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum


_PROCESS_HANDLER: PreemptionHandler | None = None


def install_preemption_handler() -> PreemptionHandler:
    """The process's handler, installed on first call; later calls return the same one
    (installed again if a finished run uninstalled it)."""
    global _PROCESS_HANDLER
    if _PROCESS_HANDLER is None:
        _PROCESS_HANDLER = PreemptionHandler()
    if not _PROCESS_HANDLER._previous:  # first call, or uninstalled by a finished run
        _PROCESS_HANDLER.install()
    return _PROCESS_HANDLER
