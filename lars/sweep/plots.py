"""The sweep's figures (matplotlib's Agg canvas, no display, no pyplot state).

val_top1_curves.png   one panel per column: val top-1 against epoch, one line per row
                      (mean over seeds, the band is +- one standard deviation)
final_top1_vs_X.png   final val top-1 against the column flag X (lr, lambda, batch, ...),
                      one line per row, error bars +- one standard deviation
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from lars.sweep.results import Cell


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _mean_curve(cell: Cell) -> tuple[list[float], list[float], list[float]]:
    """Epochs logged by every seed of the cell, with the mean and std of val top-1 there."""
    by_epoch: dict[float, list[float]] = {}
    for result in cell.results:
        for epoch, value in result.curve:
            by_epoch.setdefault(round(epoch, 6), []).append(value)
    full = len(cell.results)
    epochs = sorted(e for e, vs in by_epoch.items() if len(vs) == full)
    means = [statistics.fmean(by_epoch[e]) for e in epochs]
    stds = [statistics.stdev(by_epoch[e]) if full > 1 else 0.0 for e in epochs]
    return epochs, means, stds


def _panel_title(column: str, flag: str, rows, cells) -> str:
    """'base-lr=2' as it is; a position column '#1' gets the flag and its values: 'base-lr #1:
    0.005, 2'."""
    if not column.startswith("#"):
        return column
    values = {v for row in rows if (c := cells.get((row, column))) for v in c.column_values}
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in sorted(values, key=str))
    return f"{flag} {column}: {shown}"


def curves(path: Path, title: str, rows, columns, cells, flag: str = "") -> Path:
    panels = max(1, len(columns))
    across = min(panels, 3)
    down = math.ceil(panels / across)
    figure = _figure(4.2 * across, 3.3 * down + 0.4)
    first = None
    for number, column in enumerate(columns, start=1):
        axes = figure.add_subplot(down, across, number, sharey=first)
        first = first or axes
        for row in rows:
            cell = cells.get((row, column))
            if cell is None or not cell.results:
                continue
            epochs, means, stds = _mean_curve(cell)
            if not epochs:
                continue
            line = axes.plot(epochs, means, label=row, marker="o" if len(epochs) <= 12 else None)
            low = [m - s for m, s in zip(means, stds)]
            high = [m + s for m, s in zip(means, stds)]
            axes.fill_between(epochs, low, high, color=line[0].get_color(), alpha=0.15)
        axes.set_title(_panel_title(column, flag, rows, cells), fontsize="medium")
        axes.set_xlabel("epoch")
        axes.set_ylabel("val top-1 (%)")
        axes.grid(True, alpha=0.3)
        if number == 1 and axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="x-small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def final_vs_column(path: Path, title: str, xlabel: str, rows, columns, cells) -> Path:
    figure = _figure(6.5, 4.3)
    axes = figure.add_subplot()
    xs_all: list[float] = []
    for row in rows:
        points = []
        for column in columns:
            cell = cells.get((row, column))
            if cell is None or len(cell.column_values) != 1:
                continue
            mean, std, n = cell.stat("final_top1")
            value = cell.column_values[0]
            if mean is None or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            points.append((float(value), mean, std or 0.0))
        if not points:
            continue
        points.sort()
        xs, ys, es = zip(*points)
        xs_all += xs
        axes.errorbar(xs, ys, yerr=es, label=row, marker="o", capsize=3)
    positive = [x for x in xs_all if x > 0]
    if positive and max(positive) > 10 * min(positive):
        axes.set_xscale("log")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("final val top-1 (%)")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path
