"""Surviving preemption and bad steps: signal handling, agreement across ranks, non-finite checks.

Preemption: SLURM (`--signal`) or an operator sends SIGUSR1 or SIGTERM. The handler only records
the request; after the current optimizer step every rank learns, through one small allreduce that
all ranks join, whether any rank was signalled, so they all stop after the same step; rank 0 writes
a checkpoint and the job exits with `REQUEUE_EXIT_STATUS`, which a batch script turns into a
requeue. Repeats within a few seconds (SLURM's SIGTERM, SIGCONT, SIGTERM) are the same request;
a later signal exits at once (status 128 + signal number): lars/signals.py has the rules.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from lars.signals import (  # re-exported: the trainer and tests take them from here
    PREEMPTION_SIGNALS,
    REQUEUE_EXIT_STATUS,
    PreemptionHandler,
    install_preemption_handler,
)

__all__ = [
    "NONFINITE_EXIT_STATUS",
    "PREEMPTION_SIGNALS",
    "REQUEUE_EXIT_STATUS",
    "STALL_EXIT_STATUS",
    "PreemptionHandler",
    "StopAgreement",
    "Watchdog",
    "grads_are_finite",
    "install_preemption_handler",
    "params_are_finite",
]

NONFINITE_EXIT_STATUS = 4  # --nonfinite abort: too many non-finite steps in a row


class StopAgreement:
    """Agreement on 'some rank wants to stop': one tiny CPU allreduce per step, all ranks join.

    The first call (the loop makes it before the first step) waits for its allreduce, so a
    signal received during start-up stops every rank before any step. Later calls are
    pipelined: the flag sent after step s is read after step s + 1, so they never wait on the
    network and a signal stops the run one step after the step during which it arrived.
    """

    def __init__(self, dist, handler: PreemptionHandler) -> None:
        self.dist, self.handler = dist, handler
        self.pending = None
        self.calls = 0

    def _flag(self):
        return torch.tensor([1 if self.handler.received is not None else 0], dtype=torch.int32)

    def after_step(self) -> bool:
        """Call on every rank before the first optimizer step and after each one; True when
        all ranks must stop now (then call drain() and checkpoint)."""
        self.calls += 1
        if self.calls == 1:
            return int(self.dist.wait(self.dist.allreduce_sum_async(self._flag()))[0]) > 0
        stop = self.drain()  # started one step ago: already complete, no waiting
        self.pending = self.dist.allreduce_sum_async(self._flag())
        return stop

    def drain(self) -> bool:
        """Finish the outstanding allreduce (every rank calls this once, at the end)."""
        previous, self.pending = self.pending, None
        return previous is not None and int(self.dist.wait(previous)[0]) > 0


def grads_are_finite(optimizer) -> torch.Tensor:
    """A 0-dim bool tensor on the gradients' device: every gradient entry is finite.

    After Horovod's synchronize the gradients are identical on every rank, so every rank reaches
    the same verdict without communicating.
    """
    grads = [
        p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
    ]
    if not grads:
        return torch.tensor(True)
    norms = torch._foreach_norm(grads)  # inf or nan if any entry is
    return torch.isfinite(torch.stack(norms)).all()


def params_are_finite(model: torch.nn.Module) -> bool:
    return all(
        bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point()
    )


STALL_EXIT_STATUS = 5  # no progress for --stall-timeout seconds (a rank died or hangs)


class Watchdog:
    """Ends this process when no progress is reported for `timeout` seconds.

    A rank that is frozen (not dead) leaves the others blocked inside a collective, where
    Horovod's own stall check cannot run (its background thread is blocked in the same MPI
    call). A thread that watches the time since the last `kick()` gets them out: it prints one
    line and exits with STALL_EXIT_STATUS, and mpirun then ends the remaining ranks.
    """

    def __init__(self, timeout: float, describe=lambda: "") -> None:
        import threading

        self.timeout, self.describe = timeout, describe
        self.last = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lars-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def kick(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(min(5.0, self.timeout / 4)):
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                print(
                    f"pytorch_imagenet_resnet.py: error: no progress for {idle:.0f} s "
                    f"(--stall-timeout {self.timeout:g}) {self.describe()}: another rank "
                    "probably died or hangs; resume from the last checkpoint",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(STALL_EXIT_STATUS)
