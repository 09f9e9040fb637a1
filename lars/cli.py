"""Command-line entry point shared by `pytorch_imagenet_resnet.py` and the `lars-train` script."""

from __future__ import annotations

import sys

from lars.config import UsageError, parse_args
from lars.distributed import launched_rank
from lars.reporting import error


def main(argv: list[str] | None = None) -> int:
    """Parse, validate and train. Bad input: one line on stderr and exit status 2."""
    try:
        args = parse_args(argv)
        if args.dry_run:
            from lars.dryrun import dry_run

            dry_run(args)
            return 0
        from lars.train import RunStopped, run  # heavy imports only once the flags are good

        try:
            run(args)
        except RunStopped as stopped:
            error(str(stopped), launched_rank())
            return stopped.status
    except UsageError as problem:
        error(str(problem), launched_rank())
        return 2
    except KeyboardInterrupt:
        error("interrupted", launched_rank())
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
