"""Sweeps over training flags, and the comparison tables of the projects we build on.

`python -m lars.sweep SPEC.yaml [--dry-run] [--slurm]` runs a spec's points (here, one after
another, or as a SLURM job array); `python -m lars.sweep SPEC.yaml report` tabulates and plots
them. Specs live in `sweeps/`; the file format is described in `lars.sweep.spec`.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (`lars-sweep`)."""
    from lars.sweep.cli import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
