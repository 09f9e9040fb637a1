"""Preemption signals, recorded from the first line of the entry script on (no torch import).

SLURM (`--signal`, a time limit, preemption, `scancel`), mpirun/srun or an operator sends SIGTERM
or SIGUSR1. The handler only records the request; the training loop (`lars.faults.StopAgreement`)
makes every rank stop after the same step, checkpoint and exit with `REQUEUE_EXIT_STATUS`.

One request, or two? What SLURM really sends (measured on Slurm 22.05, see launch/slurm/README.md):
at a time limit, on preemption and on `scancel`, every task gets SIGTERM, SIGCONT, SIGTERM within
about 15 ms (the first SIGTERM from the step's kill, the second from the job's); srun forwards the
ones it gets, too. So signals that arrive within `BURST_WINDOW` seconds of the first request are
the same request and are only counted. A signal later than that is a second request (a user who
presses Ctrl-C again, an operator who sends SIGTERM twice): the process exits at once with status
128 + signal number, as if it had not handled the signal. The window is measured when Python runs
the handler, which can be late by the length of one uninterruptible C call (a blocking allreduce);
5 s covers that on a busy machine and is still short next to a user's patience.

A request must end the process within a bound even when a peer died before it could install its
handler (the others would wait in `hvd.init()` or an allreduce forever): in a process started by
pytorch_imagenet_resnet.py, a timer thread exits with 128 + signal number once
`LARS_STOP_DEADLINE` seconds (default 240: under the batch script's 300 s warning; 0 turns it off)
have passed since the first request without a normal exit.

`install_preemption_handler()` is process-wide and idempotent: the entry script installs it
before the heavy imports, so a signal during start-up is recorded instead of killing the rank,
and the trainer later gets the same handler (and whatever it already received).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

REQUEUE_EXIT_STATUS = 3  # preempted: checkpoint written, run again to resume
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
BURST_WINDOW = 5.0  # seconds: repeated signals within it are one request
DEFAULT_STOP_DEADLINE = 240.0  # seconds from the first request to a forced exit

__all__ = [
    "BURST_WINDOW",
    "PREEMPTION_SIGNALS",
    "REQUEUE_EXIT_STATUS",
    "PreemptionHandler",
    "install_preemption_handler",
    "stop_deadline",
]


def stop_deadline(environ=os.environ) -> float:
    """Seconds from the first request to a forced exit (`LARS_STOP_DEADLINE`; 0: never)."""
    value = environ.get("LARS_STOP_DEADLINE", "")
    if not value:
        return DEFAULT_STOP_DEADLINE
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        print(
            f"pytorch_imagenet_resnet.py: error: LARS_STOP_DEADLINE={value!r} is not a number of "
            "seconds >= 0",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return seconds


class PreemptionHandler:
    """Records SIGTERM/SIGUSR1: the first request, and repeats within `window` seconds, are one;
    a later signal exits the process at once (status 128 + signal number)."""

    def __init__(
        self, signals=PREEMPTION_SIGNALS, window: float = BURST_WINDOW, deadline: float = 0.0
    ) -> None:
        self.signals = signals
        self.window, self.deadline = window, deadline
        self.received: int | None = None
        self.received_at: float | None = None  # time.monotonic() of the first request
        self.count = 0  # signals handled, repeats included
        self._previous = {}
        self._timer: threading.Timer | None = None

    def install(self) -> PreemptionHandler:
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        self.cancel_deadline()

    @property
    def requested(self) -> bool:
        return self.received is not None

    def cancel_deadline(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        self.count += 1
        if self.received is None:
            self.received, self.received_at = signum, now
            if self.deadline > 0:
                self._timer = threading.Timer(self.deadline, self._expire)
                self._timer.daemon = True
                self._timer.start()
            return
        if now - self.received_at <= self.window:
            return  # the same request (SLURM's SIGTERM, SIGCONT, SIGTERM burst)
        _say(
            f"got {signal.Signals(signum).name} again, {now - self.received_at:.0f} s after "
            f"{signal.Signals(self.received).name}: exiting now, without a checkpoint"
        )
        os._exit(128 + signum)

    def _expire(self) -> None:
        _say(
            f"still running {self.deadline:g} s after {signal.Signals(self.received).name} "
            "(LARS_STOP_DEADLINE): exiting without a checkpoint; another rank probably died"
        )
        os._exit(128 + self.received)


def _say(message: str) -> None:
    try:
        os.write(2, f"pytorch_imagenet_resnet.py: {message} (pid {os.getpid()})\n".encode())
    except OSError:
        pass


_PROCESS_HANDLER: PreemptionHandler | None = None


def install_preemption_handler(deadline: float | None = None) -> PreemptionHandler:
    """The process's handler, installed on first call; later calls return the same one
    (installed again if a finished run uninstalled it).

    `deadline`: seconds from the first request to a forced exit (`stop_deadline()`); only the
    entry script sets it, since the timer would end any process that outlives its run (a test
    that trains in-process). None keeps the current setting (none at first).
    """
    global _PROCESS_HANDLER
    if _PROCESS_HANDLER is None:
        _PROCESS_HANDLER = PreemptionHandler()
    if deadline is not None:
        _PROCESS_HANDLER.deadline = deadline
    if not _PROCESS_HANDLER._previous:  # first call, or uninstalled by a finished run
        _PROCESS_HANDLER.install()
    return _PROCESS_HANDLER
