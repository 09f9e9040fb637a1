"""Planning and running a sweep's points: here one after another, or as a SLURM job array.

Each point's log dir is `<out>/<spec name>/<label>-<short fingerprint>`, so the same flags always
land in the same folder and any changed value in a new one. A point is

- done     when its marker (`sweep-point.json`) says it finished with this fingerprint, or its
           newest checkpoint is at the run's final step: it is skipped;
- partial  when its folder holds a checkpoint or a marker but it is not done: it is run again in
           the same folder, and the trainer's `--resume auto` continues it;
- new      otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lars.sweep.flags import FlagTable
from lars.sweep.spec import Point, Spec, SpecError
from lars.sweep.trainer import (
    DryRun,
    TrainerError,
    dry_run,
    point_settings,
    short_fingerprint,
)

MARKER = "sweep-point.json"
TRAIN_LOG = "train.log"
REQUEUE_EXIT_STATUS = 3  # the trainer stopped at a checkpoint (signal): stop the sweep too
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)\.pt$")
REPO = Path(__file__).resolve().parents[2]
ARRAY_SCRIPT = REPO / "launch" / "sweep_array.sbatch"
MPIRUN = REPO / "launch" / "mpirun.sh"
PATH_FLAGS = ("--train-dir", "--val-dir", "--data-dir")


@dataclass
class Planned:
    point: Point
    argv: list[str]  # training flags, without --log-dir
    fingerprint: str
    log_dir: Path
    dry: DryRun | None = None

    @property
    def max_steps(self) -> int | None:
        value = self.point.flags.get("--max-steps")
        return int(value) if value else None

    def train_argv(self) -> list[str]:
        return [*self.argv, "--log-dir", str(self.log_dir)]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-").lower()[:48]


def plan_points(spec: Spec, table: FlagTable) -> list[Planned]:
    """Every point with its argv, fingerprint and log dir (no dry run yet)."""
    planned = []
    for point in spec.points:
        fingerprint = short_fingerprint(point_settings(point, table))
        head = point.label or str(point.flags.get("--base-op", "run"))
        slug = _slug(head) or "run"
        planned.append(
            Planned(
                point=point,
                argv=table.argv(point.flags),
                fingerprint=fingerprint,
                log_dir=spec.out / spec.name / f"{slug}-{fingerprint}",
            )
        )
    return planned


def missing_data(planned: Planned) -> str | None:
    """The first data path a point names that is not on this machine, as 'FLAG PATH'."""
    for flag in PATH_FLAGS:
        path = planned.point.flags.get(flag)
        if path is not None and not Path(path).exists():
            return f"{flag} {path}"
    return None


def check_points(spec: Spec, planned: list[Planned], parser_flags: FlagTable) -> None:
    """The trainer's own --dry-run for every point; the first rejection raises SpecError naming
    the spec file, the point and (in the trainer's message) the flag. With `train-images:` in the
    spec and a trainer that accepts --train-images, points whose data is absent are planned
    without it."""
    data_free = spec.train_images is not None and parser_flags.action("train-images") is not None
    for item in planned:
        argv = item.argv
        if data_free and missing_data(item):
            argv = [*argv, "--train-images", str(spec.train_images)]
        try:
            item.dry = dry_run(argv, item.point.ranks)
        except TrainerError as error:
            raise TrainerError(f"{spec.path}: {item.point.describe()}: {error}") from error
        if item.dry.status != 0:
            raise SpecError(f"{spec.path}: {item.point.describe()}: {item.dry.message}")


def newest_checkpoint_step(log_dir: Path) -> int | None:
    if not log_dir.is_dir():
        return None
    steps = [int(m.group(1)) for name in os.listdir(log_dir) if (m := _CHECKPOINT.match(name))]
    return max(steps) if steps else None


def read_marker(log_dir: Path) -> dict:
    try:
        marker = json.loads((log_dir / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def point_state(item: Planned) -> str:
    """done, partial or new (see the module docstring)."""
    marker = read_marker(item.log_dir)
    if marker.get("status") == "done" and marker.get("fingerprint") == item.fingerprint:
        if marker.get("final_step") == _final_step(item):
            return "done"
    step = newest_checkpoint_step(item.log_dir)
    final = _final_step(item)
    if step is not None and final is not None and step >= final:
        return "done"
    return "partial" if step is not None or marker else "new"


def _final_step(item: Planned) -> int | None:
    return item.dry.final_step(item.max_steps) if item.dry else None


def _write_marker(item: Planned, **fields) -> None:
    item.log_dir.mkdir(parents=True, exist_ok=True)
    marker = {
        "fingerprint": item.fingerprint,
        "point": item.point.index,
        "label": item.point.label,
        "ranks": item.point.ranks,
        "flags": {k.lstrip("-"): v for k, v in item.point.flags.items()},
        "final_step": _final_step(item),
        **fields,
    }
    tmp = item.log_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, item.log_dir / MARKER)


def training_command(item: Planned) -> list[str]:
    """`python pytorch_imagenet_resnet.py ...`, under launch/mpirun.sh NP for more than 1 rank."""
    script = REPO / "pytorch_imagenet_resnet.py"
    train = (
        [sys.executable, str(script)] if script.is_file() else [sys.executable, "-m", "lars.cli"]
    )
    train += item.train_argv()
    if item.point.ranks == 1:
        return train
    # An installed package has no launch/: plain mpirun (add Open MPI's flags yourself).
    launcher = [str(MPIRUN)] if MPIRUN.is_file() else ["mpirun", "-np"]
    return [*launcher, str(item.point.ranks), *train]


def run_local(planned: list[Planned], echo=print) -> int:
    """Run the points that are not done, one after another. Returns 0 when every point is done,
    the requeue status when a point was stopped by a signal (the rest are left), else 1."""
    failed = 0
    for number, item in enumerate(planned, start=1):
        state = point_state(item)
        head = f"[{number}/{len(planned)}] {item.point.describe()}"
        if state == "done":
            echo(f"{head}: done, skipped ({item.log_dir})")
            continue
        command = training_command(item)
        echo(f"{head}: {'resuming' if state == 'partial' else 'running'} in {item.log_dir}")
        started = time.time()
        _write_marker(item, status="running", started=started, command=command)
        with open(item.log_dir / TRAIN_LOG, "a") as log:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            status = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        wall = time.time() - started
        _write_marker(
            item,
            status="done" if status == 0 else f"exit {status}",
            started=started,
            wall_s=round(wall, 3),
            command=command,
        )
        if status == 0:
            echo(f"{head}: finished in {wall:.1f} s")
            continue
        echo(f"{head}: exit status {status}; last lines of {item.log_dir / TRAIN_LOG}:")
        for line in _tail(item.log_dir / TRAIN_LOG, 3):
            echo(f"    {line}")
        if status == REQUEUE_EXIT_STATUS:
            echo("stopped at a checkpoint: run the same command again to go on")
            return status
        failed += 1
    return 1 if failed else 0


def _tail(path: Path, count: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-count:]
    except OSError:
        return []


def slurm_commands(
    spec: Spec, planned: list[Planned], sweep_dir: Path, write: bool = True
) -> list[list[str]]:
    """Write one argument file per pending point (NUL-separated training flags) and return one
    `sbatch --array` command per rank count; launch/sweep_array.sbatch runs task i's file.
    `write=False` (--dry-run) returns the commands and writes nothing."""
    groups: dict[int, list[Planned]] = {}
    for item in planned:
        if point_state(item) != "done":
            groups.setdefault(item.point.ranks, []).append(item)
    commands = []
    parallel = spec.slurm.get("parallel")
    extra = [str(arg) for arg in spec.slurm.get("sbatch-args", [])]
    per_node = int(spec.slurm.get("gpus-per-node", 8))
    for ranks, items in sorted(groups.items()):
        task_dir = sweep_dir / "slurm" / f"ranks{ranks}"
        if write:
            _write_tasks(task_dir, items)
        array = f"0-{len(items) - 1}" + (f"%{int(parallel)}" if parallel else "")
        commands.append(
            [
                "sbatch",
                f"--array={array}",
                f"--job-name={spec.name}-r{ranks}",
                *_layout(ranks, per_node, spec),
                *extra,
                str(ARRAY_SCRIPT),
                str(task_dir.resolve()),
            ]
        )
    return commands


def _write_tasks(task_dir: Path, items: list[Planned]) -> None:
    task_dir.mkdir(parents=True, exist_ok=True)
    for old in task_dir.glob("task-*.args"):
        old.unlink()
    for i, item in enumerate(items):
        (task_dir / f"task-{i:04d}.args").write_bytes(
            b"".join(word.encode() + b"\0" for word in item.train_argv())
        )
    (task_dir / "points.txt").write_text(
        "".join(f"{i}\t{it.point.describe()}\t{it.log_dir}\n" for i, it in enumerate(items))
    )


def _layout(ranks: int, per_node: int, spec: Spec) -> list[str]:
    """One rank per GPU, whole nodes: launch/slurm.sbatch's layout for `ranks` ranks."""
    on_node = min(ranks, per_node)
    if ranks % on_node:
        raise SpecError(
            f"{spec.path}: ranks {ranks} do not fill whole nodes of {per_node} GPUs "
            "(slurm: gpus-per-node)"
        )
    nodes = ranks // on_node
    return [f"--nodes={nodes}", f"--ntasks-per-node={on_node}", f"--gpus-per-node={on_node}"]
