"""The application layer: command line -> settings -> run, and the only code that knows exit
codes. Shared by `pytorch_imagenet_resnet.py` and the `lars-train` script.

    0   trained (or nothing left to do)      3   preempted: checkpointed, run again to resume
    2   bad input: one line on stderr         4   too many non-finite steps: last good state saved
    130 interrupted (Ctrl-C)                  5   a stalled rank (lars.faults.Watchdog exits)
"""

from __future__ import annotations

import sys

from lars.config import parse_settings
from lars.distributed import launched_rank
from lars.errors import NonFiniteAbort, Preempted, RunStopped, TrainingError


def error(message: str, rank: int = 0) -> None:
    """One line on stderr, from rank 0 only (every rank hits the same bad input)."""
    if rank == 0:
        print(f"pytorch_imagenet_resnet.py: error: {message}", file=sys.stderr, flush=True)


def _stop_status(stopped: RunStopped) -> int:
    from lars.faults import NONFINITE_EXIT_STATUS, REQUEUE_EXIT_STATUS

    return {Preempted: REQUEUE_EXIT_STATUS, NonFiniteAbort: NONFINITE_EXIT_STATUS}[type(stopped)]


def main(argv: list[str] | None = None) -> int:
    """Parse, validate and train (or --dry-run). argparse exits 2 itself on unknown flags."""
    try:
        settings = parse_settings(argv)
        if settings.run.dry_run:
            from lars.dryrun import dry_run

            dry_run(settings)
            return 0
        if settings.run.evaluate:
            from lars.evaluation import evaluate_checkpoint

            evaluate_checkpoint(settings)
            return 0
        from lars.train import run  # heavy imports only once the flags are good

        run(settings)
    except RunStopped as stopped:
        error(str(stopped), launched_rank())
        return _stop_status(stopped)
    except TrainingError as problem:  # settings, data, resume, backend: the user can fix it
        error(str(problem), launched_rank())
        return 2
    except KeyboardInterrupt:
        error("interrupted", launched_rank())
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
