"""What each point's run logged, and the cells of the comparison table built from it.

Per point (from its TensorBoard event files, read with lars.report's loader):
    best top-1    max of val/top1          final top-1 / top-5   val/top1, val/top5 at the last step
                  (--task barlowtwins: the linear probe's linear/top1, linear/top5; the curve
                  is the k-NN monitor's ssl/knn_top1 against the pre-training epoch)
    images/s      median of train/images_per_sec (the first log interval holds start-up costs)
    s / epoch     median time between consecutive validations (event wall times), which is
                  training plus validation; with one validation, the marker's wall time / epochs
Per cell (one row x one column, all seeds): mean and sample standard deviation (n - 1) of each.
Rows are the case label plus every swept value that is not the column; columns are the values of
the column flag (or their position in each case's list, `column-by: position`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from lars.sweep.run import Planned, newest_checkpoint_step, read_marker


@dataclass
class PointResult:
    planned: Planned
    best_top1: float | None
    final_top1: float | None
    final_top5: float | None
    images_per_sec: float | None
    epoch_seconds: float | None
    curve: list[tuple[float, float]]  # (epoch, val top-1)


@dataclass
class Cell:
    row: str
    column: str
    column_values: list  # the column flag's value(s) in this cell (one unless by position)
    results: list[PointResult] = field(default_factory=list)

    def stat(self, name: str) -> tuple[float | None, float | None, int]:
        values = [getattr(r, name) for r in self.results if getattr(r, name) is not None]
        if not values:
            return None, None, 0
        std = statistics.stdev(values) if len(values) > 1 else None
        return statistics.fmean(values), std, len(values)


def _wall_times(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, wall time) of every `tag` event; a later write at a step wins (resumed runs)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})
    accumulator.Reload()
    if tag not in accumulator.Tags().get(SCALARS, []):
        return []
    by_step = {int(e.step): float(e.wall_time) for e in accumulator.Scalars(tag)}
    return sorted(by_step.items())


def finished(planned: Planned, config: dict) -> bool:
    """The sweep's marker says done, or (a SLURM task, which writes no marker) the newest
    checkpoint is at the run's last step (config.json: the plan's total, or --max-steps)."""
    marker = read_marker(planned.log_dir)
    if marker:
        return marker.get("status") == "done" and marker.get("fingerprint") == planned.fingerprint
    total = config.get("plan", {}).get("total_steps")
    max_steps = config.get("args", {}).get("max_steps")
    step = newest_checkpoint_step(planned.log_dir)
    if not isinstance(total, int) or step is None:
        return False
    return step >= (min(total, max_steps) if isinstance(max_steps, int) else total)


def load_result(planned: Planned) -> PointResult | None:
    """The point's metrics, or None when it has not finished (or never started)."""
    from lars.report import RunDirError, load_run

    try:
        run = load_run(planned.log_dir)
    except RunDirError:
        return None
    if not finished(planned, run.config):
        return None
    scored = "linear" if run.config.get("args", {}).get("task") == "barlowtwins" else "val"
    val = run.scalars.get(f"{scored}/top1", [])
    top5 = run.scalars.get(f"{scored}/top5", [])
    curve = val if scored == "val" else run.scalars.get("ssl/knn_top1", [])
    speed = [v for _, v in run.scalars.get("train/images_per_sec", [])]
    steps_per_epoch = run.config.get("plan", {}).get("steps_per_epoch") or None
    walls = [t for _, t in _wall_times(planned.log_dir, "val/top1")]
    deltas = [b - a for a, b in zip(walls, walls[1:])]
    epoch_seconds = statistics.median(deltas) if deltas else None
    if epoch_seconds is None and val:
        wall = read_marker(planned.log_dir).get("wall_s")
        epoch_seconds = float(wall) / len(val) if wall else None
    scale = float(steps_per_epoch) if steps_per_epoch else 1.0
    return PointResult(
        planned=planned,
        best_top1=max(v for _, v in val) if val else None,
        final_top1=val[-1][1] if val else None,
        final_top5=top5[-1][1] if top5 else None,
        images_per_sec=statistics.median(speed[1:] or speed) if speed else None,
        epoch_seconds=epoch_seconds,
        curve=[(step / scale, value) for step, value in curve],
    )


def column_flag(spec, planned: list[Planned]) -> str:
    """The table's column axis as a point.swept key ('--base-lr', 'ranks'); default: the first
    swept axis of the first point."""
    name = spec.table.get("columns")
    axes = {key for point in spec.points for key in point.swept}
    if name is None:
        return next(iter(spec.points[0].swept), "") if spec.points else ""
    name = str(name)
    if name in axes or name == "case":
        return name
    return "--" + name.lstrip("-").replace("_", "-")


def _format_value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def row_label(point, column: str) -> str:
    parts = [point.label] if point.label and column != "case" else []
    parts += [
        f"{flag.lstrip('-')}={_format_value(v)}"
        for flag, v in point.swept.items()
        if flag != column
    ]
    if not parts:
        parts.append(str(point.flags.get("--base-op", "run")))
    return " ".join(parts)


def build_cells(
    spec, results: list[PointResult], planned: list[Planned]
) -> tuple[list, list, dict]:
    """(row labels, column labels, {(row, column): Cell}) in the spec's order; every point gets
    a cell, with or without results."""
    column = column_flag(spec, planned)
    by_position = spec.table.get("column-by", "value") == "position"
    found = {id(r.planned): r for r in results}
    rows: list[str] = []
    columns: list[str] = []
    cells: dict[tuple[str, str], Cell] = {}
    order: list[tuple[int, str]] = []
    for item in planned:
        point = item.point
        value = point.label if column == "case" else point.swept.get(column)
        if by_position:
            position = point.column_position.get(column, 0)
            key, sort = f"#{position + 1}", (position, "")
        else:
            head = "" if column == "case" else f"{column.lstrip('-')}="
            key, sort = f"{head}{_format_value(value)}", (0, "")
        row = row_label(point, column)
        if row not in rows:
            rows.append(row)
        if key not in columns:
            columns.append(key)
            order.append(sort)
        cell = cells.setdefault((row, key), Cell(row=row, column=key, column_values=[]))
        if value not in cell.column_values:
            cell.column_values.append(value)
        if id(item) in found:
            cell.results.append(found[id(item)])
    if by_position:
        columns = [c for _, c in sorted(zip(order, columns))]
    return rows, columns, cells
