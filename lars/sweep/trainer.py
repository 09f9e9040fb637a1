"""What the sweep asks of the trainer: its flag parser, its `--dry-run`, and a point's identity.

The sweep never re-derives what the trainer decides. The flags are checked against the trainer's
own argparse parser, every point goes through the trainer's own `--dry-run` (in this process:
one import of torch for the whole sweep, not one per point), and the global batch, scaled LR and
step counts shown for a point are read from that dry run's output.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
from dataclasses import dataclass

from lars.sweep.spec import Point

# The trainer's dry-run lines (lars/dryrun.py): "global batch  64 = ...", "learning rate  2 = ...",
# "steps  22 per epoch x 4 epochs = 88; warm-up 11 steps ...".
_GLOBAL_BATCH = re.compile(r"^\s*global batch\s+(\d+)", re.M)
_LR = re.compile(r"^\s*learning rate\s+([-+0-9.eE]+|nan|inf)", re.M)
_STEPS = re.compile(r"^\s*steps\s+(\d+) per epoch x (\d+) epochs = (\d+); warm-up (\d+)", re.M)


def trainer_parser() -> argparse.ArgumentParser:
    """The trainer's argparse parser: lars.cli's, else lars.config's `get_args_parser()`."""
    for module_name in ("lars.cli", "lars.config"):
        module = importlib.import_module(module_name)
        for name in ("get_args_parser", "build_parser", "make_parser"):
            build = getattr(module, name, None)
            if callable(build):
                return build()
    raise RuntimeError("cannot find the trainer's flag parser in lars.cli or lars.config")


class TrainerError(RuntimeError):
    """The trainer failed in a way that is not the spec's fault (a crash in its --dry-run)."""


@dataclass
class DryRun:
    """The trainer's verdict on one point: exit status, its message, and the plan it printed."""

    status: int
    message: str  # the trainer's error line (status != 0), else ""
    output: str
    global_batch: int | None = None
    lr: float | None = None
    steps_per_epoch: int | None = None
    epochs: int | None = None
    total_steps: int | None = None
    warmup_steps: int | None = None

    def final_step(self, max_steps: int | None) -> int | None:
        """The optimizer step the run ends at: the plan's total, or --max-steps if earlier."""
        if self.total_steps is None:
            return None
        return min(self.total_steps, max_steps) if max_steps else self.total_steps


def _last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "error:" in line:
            return line.split("error:", 1)[1].strip()
    return lines[-1] if lines else "rejected without a message"


def parse_dry_run(status: int, output: str, errors: str) -> DryRun:
    result = DryRun(
        status=status, message=_last_error_line(errors) if status else "", output=output
    )
    if status:
        return result
    if m := _GLOBAL_BATCH.search(output):
        result.global_batch = int(m.group(1))
    if m := _LR.search(output):
        result.lr = float(m.group(1))
    if m := _STEPS.search(output):
        steps, epochs, total, warm = map(int, m.groups())
        result.steps_per_epoch, result.epochs = steps, epochs
        result.total_steps, result.warmup_steps = total, warm
    return result


def dry_run(argv: list[str], ranks: int) -> DryRun:
    """Run the trainer's `--dry-run` for these flags in this process; never raises for bad input
    (argparse's exit and the trainer's one-line errors come back as status and message)."""
    from lars.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([*argv, "--dry-run", "--ranks", str(ranks)])
        except SystemExit as stop:  # argparse: unknown flag or bad type
            status = stop.code if isinstance(stop.code, int) else 2
        except Exception as crash:  # a trainer bug, not a bad spec: say so, do not hide it
            raise TrainerError(
                f"the trainer's --dry-run crashed ({type(crash).__name__}: {crash})"
            ) from crash
    return parse_dry_run(int(status or 0), out.getvalue(), err.getvalue())


def point_settings(point: Point, flag_table) -> dict:
    """The point's identity as a plain mapping: every flag it sets (by argparse dest, typed) and
    its ranks. Defaults are left out on purpose, so a point keeps its log dir when the trainer
    gains a flag; `sweep_ranks` is kept because a sweep over ranks must not share log dirs."""
    settings = {flag_table.action(option).dest: value for option, value in point.flags.items()}
    settings["sweep_ranks"] = point.ranks
    return settings


def short_fingerprint(settings: dict) -> str:
    """The run fingerprint's short form (lars.fingerprint, TRUST's run identity); the one place
    to change if the trainer's fingerprint ever needs different input."""
    from lars.fingerprint import short_fingerprint as short

    return short(settings)
