"""The comparison as its sources print it: markdown tables and a CSV, rows x swept values.

report.md   best / final val top-1 (mean +- std over seeds), then final top-5, images/s,
            wall time per epoch and the speed-up over the baseline column, one table each
report.csv  one line per cell: every statistic, the seed count and the log dirs
"""

from __future__ import annotations

import csv
import io

from lars.sweep.results import Cell, column_flag

METRICS = (
    # (attribute, markdown heading, format)
    ("final_top5", "Final val top-5 (%)", ".2f"),
    ("images_per_sec", "Training images/s (median over log intervals)", ".1f"),
    ("epoch_seconds", "Wall time per epoch (s; training + validation)", ".2f"),
)


def _mean_std(cell: Cell | None, name: str, fmt: str) -> str:
    if cell is None:
        return ""
    mean, std, n = cell.stat(name)
    if mean is None:
        return "n/a"
    return f"{mean:{fmt}} ± {std:{fmt}}" if std is not None else f"{mean:{fmt}}"


def baseline_column(spec, columns: list[str], override=None) -> str | None:
    """The column key named by `table.baseline` (a column value, or a position with
    column-by: position), or None when the spec names none."""
    value = override if override is not None else spec.table.get("baseline")
    if value is None:
        return None
    if spec.table.get("column-by", "value") == "position":
        key = f"#{value}"
    else:
        flag = column_flag(spec, []) or ""
        text = f"{value:g}" if isinstance(value, float) else str(value)
        key = text if flag == "case" else f"{flag.lstrip('-')}={text}"
        if key not in columns:  # '2' written for a float column holding 2.0
            key = next((c for c in columns if c.split("=", 1)[-1] == text), key)
    if key not in columns:
        raise ValueError(f"baseline {value!r} is not a column ({', '.join(columns)})")
    return key


def speedup(cells, row: str, column: str, base: str | None) -> float | None:
    """Wall time per epoch of the baseline column over this column's, in the same row."""
    if base is None:
        return None
    here, there = cells.get((row, column)), cells.get((row, base))
    if here is None or there is None:
        return None
    t_here, _, _ = here.stat("epoch_seconds")
    t_base, _, _ = there.stat("epoch_seconds")
    return t_base / t_here if t_here and t_base else None


def _values_cell(cells, row: str, columns: list[str]) -> str:
    values = []
    for column in columns:
        cell = cells.get((row, column))
        if cell is not None:
            values += [f"{v:g}" if isinstance(v, float) else str(v) for v in cell.column_values]
    return ", ".join(values)


def _table(heading: str, rows, columns, render, values=None) -> list[str]:
    """A markdown table: one line per row, `render(row, column)` in each cell."""
    header = ["", *(["values"] if values else []), *columns]
    lines = [f"**{heading}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        words = [row.replace("|", "\\|"), *([values(row)] if values else [])]
        words += [render(row, column) for column in columns]
        lines.append("| " + " | ".join(words) + " |")
    return lines + [""]


def _speedup_text(cells, base: str):
    def render(row: str, column: str) -> str:
        value = speedup(cells, row, column, base)
        return "n/a" if value is None else f"{value:.2f}x"

    return render


def markdown(spec, rows, columns, cells, base: str | None, points: int | None = None) -> str:
    """The report: what was run, then one table per statistic. `points`: how many of the spec's
    points were asked for (a --seeds subset), default all."""
    by_position = spec.table.get("column-by", "value") == "position"
    flag = (column_flag(spec, []) or "column").lstrip("-")
    values = (lambda row: _values_cell(cells, row, columns)) if by_position else None
    seeds = max((len(c.results) for c in cells.values()), default=0)
    done = sum(len(c.results) for c in cells.values())
    where = " by position in each row's list (the row's values: `values`)" if by_position else ""
    lines = [f"# {spec.name}", ""]
    if spec.description:
        lines += [spec.description, ""]
    total = len(spec.points) if points is None else points
    subset = f" (a subset of the spec's {len(spec.points)})" if total != len(spec.points) else ""
    lines += [
        f"{done} of {total} runs{subset} finished and are shown; cells are the mean ± sample "
        f"standard deviation over up to {seeds} run(s) (seeds); columns: {flag}{where}.",
        "",
    ]
    lines += _table(
        "Best / final val top-1 (%)", rows, columns, lambda r, c: _join(cells.get((r, c))), values
    )
    for name, heading, fmt in METRICS:

        def render(row, column, name=name, fmt=fmt):
            return _mean_std(cells.get((row, column)), name, fmt)

        lines += _table(heading, rows, columns, render, values)
    if base is not None:
        heading = f"Speed-up in wall time per epoch over {base}"
        lines += _table(heading, rows, columns, _speedup_text(cells, base), values)
    return "\n".join(lines)


def _join(cell: Cell | None) -> str:
    if cell is None:
        return ""
    best, final = _mean_std(cell, "best_top1", ".2f"), _mean_std(cell, "final_top1", ".2f")
    return "n/a" if best == "n/a" else f"{best} / {final}"


CSV_FIELDS = (
    "row",
    "column",
    "column_values",
    "runs",
    "best_top1_mean",
    "best_top1_std",
    "final_top1_mean",
    "final_top1_std",
    "final_top5_mean",
    "final_top5_std",
    "images_per_sec_mean",
    "epoch_seconds_mean",
    "speedup",
    "log_dirs",
)


def csv_text(rows, columns, cells, base: str | None) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for row in rows:
        for column in columns:
            cell = cells.get((row, column))
            if cell is None:
                continue
            stats = []
            for name in ("best_top1", "final_top1", "final_top5"):
                mean, std, _ = cell.stat(name)
                stats += [_num(mean), _num(std)]
            writer.writerow(
                [
                    row,
                    column,
                    " ".join(map(str, cell.column_values)),
                    len(cell.results),
                    *stats,
                    _num(cell.stat("images_per_sec")[0]),
                    _num(cell.stat("epoch_seconds")[0]),
                    _num(speedup(cells, row, column, base)),
                    " ".join(str(r.planned.log_dir) for r in cell.results),
                ]
            )
    return out.getvalue()


def _num(value) -> str:
    return "" if value is None else repr(round(float(value), 6))
