"""`python -m lars.sweep SPEC.yaml [run|report]`: run a sweep's points, or tabulate them.

    python -m lars.sweep sweeps/sample_claim.yaml --dry-run   # every point, checked by the trainer
    python -m lars.sweep sweeps/sample_claim.yaml             # run what is not done yet, here
    python -m lars.sweep sweeps/lars_imagenet.yaml --slurm    # one SLURM array task per point
    python -m lars.sweep sweeps/sample_claim.yaml report --out docs/experiments/sample_claim

Before anything runs, every point goes through the trainer's own `--dry-run`; the first point
the trainer rejects (or an unknown flag, an empty grid) stops the sweep with one line naming the
spec, the point and the flag, and exit status 2.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from lars.sweep.flags import FlagTable
from lars.sweep.spec import SpecError, load_spec

PROG = "python -m lars.sweep"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("spec", metavar="SPEC.yaml", help="sweep spec (see sweeps/*.yaml)")
    p.add_argument("verb", nargs="?", default="run", choices=("run", "report"))
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the points (global batch, scaled lr, steps, state, log dir); run nothing",
    )
    p.add_argument("--slurm", action="store_true", help="submit one SLURM job array per rank count")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="only the points with these seeds (run a subset first; the rest later)",
    )
    p.add_argument("--out", help="report: output folder (default: <sweep dir>/report)")
    p.add_argument("--baseline", help="report: the column for the speed-up (default: the spec's)")
    return p


def _fail(message: str) -> int:
    print(f"lars.sweep: error: {message}", file=sys.stderr)
    return 2


def _listing(spec, planned) -> None:
    from lars.sweep.run import point_state

    states = [point_state(item) for item in planned]
    counts = {s: states.count(s) for s in ("done", "partial", "new") if s in states}
    shown = ", ".join(f"{n} {s}" for s, n in counts.items())
    print(f"{spec.path}: {spec.name}, {len(planned)} point(s) ({shown})")
    header = (
        f"{'#':>4}  {'ranks':>5}  {'global batch':>12}  {'lr':>10}  {'steps':>18}  state    point"
    )
    print(header)
    for item, state in zip(planned, states):
        dry = item.dry
        steps = (
            f"{dry.steps_per_epoch} x {dry.epochs} = {item.dry.final_step(item.max_steps)}"
            if dry and dry.total_steps is not None
            else "n/a"
        )
        batch = str(dry.global_batch) if dry and dry.global_batch else "n/a"
        lr = f"{dry.lr:.6g}" if dry and dry.lr is not None else "n/a"
        print(
            f"{item.point.index:>4}  {item.point.ranks:>5}  {batch:>12}  {lr:>10}  {steps:>18}  "
            f"{state:<7}  {item.point.describe()}\n{'':>6}-> {item.log_dir}"
        )


def _report(spec, planned, args) -> int:
    from lars.sweep import plots
    from lars.sweep.results import build_cells, column_flag, load_result
    from lars.sweep.table import baseline_column, csv_text, markdown

    results = [r for r in (load_result(item) for item in planned) if r is not None]
    if not results:
        return _fail(f"{spec.path}: no point has results yet (run the sweep first)")
    rows, columns, cells = build_cells(spec, results, planned)
    try:
        base = baseline_column(spec, columns, args.baseline)
    except ValueError as error:
        return _fail(f"{spec.path}: --baseline: {error}")
    out = Path(args.out) if args.out else spec.out / spec.name / "report"
    out.mkdir(parents=True, exist_ok=True)
    flag = column_flag(spec, planned).lstrip("-") or "column"
    written = [out / "report.md", out / "report.csv"]
    written[0].write_text(markdown(spec, rows, columns, cells, base, len(planned)) + "\n")
    written[1].write_text(csv_text(rows, columns, cells, base))
    written.append(plots.curves(out / "val_top1_curves.png", spec.name, rows, columns, cells, flag))
    written.append(
        plots.final_vs_column(
            out / f"final_top1_vs_{flag}.png", spec.name, flag, rows, columns, cells
        )
    )
    for path in written:
        print(path)
    return 0


def _submit(spec, planned, dry: bool) -> int:
    from lars.sweep.run import slurm_commands

    sweep_dir = spec.out / spec.name
    commands = slurm_commands(spec, planned, sweep_dir, write=not dry)
    if not commands:
        print(f"{spec.path}: every point is done; nothing to submit")
        return 0
    for command in commands:
        print(("would run: " if dry else "$ ") + shlex.join(command))
        if dry:
            continue
        if shutil.which(command[0]) is None:
            return _fail("sbatch not found: run this on a SLURM login node (or drop --slurm)")
        status = subprocess.call(command)
        if status != 0:
            return _fail(f"sbatch exited with status {status}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from lars.sweep.run import check_points, plan_points, run_local
    from lars.sweep.trainer import TrainerError, trainer_parser

    parser = trainer_parser()
    table = FlagTable(parser)
    try:
        spec = load_spec(args.spec, parser)
        planned = plan_points(spec, table)
        if args.seeds:
            planned = [item for item in planned if item.point.seed in args.seeds]
            if not planned:
                raise SpecError(f"{spec.path}: --seeds {' '.join(map(str, args.seeds))}: no point")
        if args.verb == "report":
            return _report(spec, planned, args)
        if spec.pending:
            return _fail(f"{spec.path}: pending: {spec.pending}")
        check_points(spec, planned, table)
    except SpecError as error:
        return _fail(str(error))
    except TrainerError as error:
        print(f"lars.sweep: error: {error}", file=sys.stderr)
        return 1
    if args.dry_run:
        _listing(spec, planned)
        return _submit(spec, planned, dry=True) if args.slurm else 0
    if args.slurm:
        return _submit(spec, planned, dry=False)
    return run_local(planned)


if __name__ == "__main__":
    sys.exit(main())
