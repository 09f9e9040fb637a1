"""Curves and a summary table for finished (or still running) training runs, from their log dirs.

    python -m lars.report runs/sample-resnet18_small-lars-gb64 runs/sample-resnet18_small-lamb-gb64
    python -m lars.report runs/* --out report/

Each RUN_DIR is a `--log-dir` of pytorch_imagenet_resnet.py. The TensorBoard event files in it are
read directly (no TensorBoard server) and `--out` (default `report/`) receives:

    val_top1.png     val/top1 against epochs        train_loss.png   train/loss against epochs
    lr.png           train/lr against epochs        trust_ratio.png  mean of trust_ratio/* tags
    summary.md       one table row per run: final val top-1/top-5/loss, train loss, optimizer,
                     global batch, learning rate, last optimizer step

One line per run, labelled with the run's optimizer (`args.base_op` in its config.json; the folder
name when there is no config.json, or added in brackets when two runs share an optimizer). The x
axis is the epoch, optimizer step / `plan.steps_per_epoch` from config.json; when a run has no
steps_per_epoch every plot falls back to optimizer steps, so runs are never drawn in mixed units.
A run that was resumed holds several event files: TensorBoard's own loader drops the events that
the resumed writer purged (`purge_step`), and of two values logged at one step the later is kept.

A missing folder, a folder without event files or an unreadable config.json stops the command
with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

EVENT_FILE_PATTERN = "events.out.tfevents.*"
TRUST_RATIO_PREFIX = "trust_ratio/"

# (file name, scalar tag, title, y label); "trust_ratio" is the mean over trust_ratio/* tags.
PLOTS = (
    ("val_top1.png", "val/top1", "Validation top-1", "top-1 accuracy (%)"),
    ("train_loss.png", "train/loss", "Training loss", "cross-entropy loss"),
    ("lr.png", "train/lr", "Learning rate", "learning rate (param group 0)"),
    ("trust_ratio.png", "trust_ratio", "Mean trust ratio", "mean of trust_ratio/* tags"),
)
# Learning rates and trust ratios of different optimizers differ by orders of magnitude (LARS's
# eta = 0.001 against LAMB's ratio near 1): these plots switch to a log axis when the positive
# values span more than WIDE_RANGE.
LOG_WHEN_WIDE = ("train/lr", "trust_ratio")
WIDE_RANGE = 100.0
SUMMARY_FILE = "summary.md"

Series = list[tuple[int, float]]  # (optimizer step, value), sorted by step


class RunDirError(ValueError):
    """A run folder that cannot be reported: missing, without event files, or a bad config.json."""


@dataclass
class RunRecord:
    """One training run: its folder name, config.json contents and every scalar it logged."""

    name: str
    config: dict
    scalars: dict[str, Series]
    path: Path | None = field(default=None, compare=False)

    @property
    def optimizer(self) -> str | None:
        """`--base-op` of the run (lars, tvlars, lamb, ...), if config.json says."""
        value = self.config.get("args", {}).get("base_op")
        return str(value) if value is not None else None

    @property
    def steps_per_epoch(self) -> int | None:
        value = self.config.get("plan", {}).get("steps_per_epoch")
        return int(value) if isinstance(value, (int, float)) and value > 0 else None

    def final(self, tag: str) -> float | None:
        """The value logged at the highest step for `tag`, or None if the tag was never logged."""
        series = self.scalars.get(tag)
        return series[-1][1] if series else None

    def last_step(self) -> int | None:
        steps = [series[-1][0] for series in self.scalars.values() if series]
        return max(steps) if steps else None

    def mean_trust_ratio(self) -> Series:
        """Per optimizer step, the mean over every trust_ratio/<param> tag logged at that step."""
        by_step: dict[int, list[float]] = defaultdict(list)
        for tag, series in self.scalars.items():
            if tag.startswith(TRUST_RATIO_PREFIX):
                for step, value in series:
                    by_step[step].append(value)
        return [(step, sum(values) / len(values)) for step, values in sorted(by_step.items())]


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunDirError(f"{path}: unreadable config.json ({error})") from None
    if not isinstance(config, dict):
        raise RunDirError(f"{path}: config.json holds {type(config).__name__}, not an object")
    return config


def _read_scalars(folder: Path) -> dict[str, Series]:
    # Imported here so that `import lars.report` stays cheap; tensorboard is a dependency anyway.
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    # size_guidance 0 keeps every event (the default samples scalars down to 10,000 per tag).
    # Given the folder, the accumulator reads its event files in order and purges what a resumed
    # writer's purge_step marked as orphaned.
    accumulator = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    tb_logger = logging.getLogger("tensorboard")  # it warns about every purge, which is expected
    level = tb_logger.level
    tb_logger.setLevel(logging.ERROR)
    try:
        accumulator.Reload()
    finally:
        tb_logger.setLevel(level)
    scalars: dict[str, Series] = {}
    for tag in accumulator.Tags().get(SCALARS, []):
        by_step: dict[int, float] = {}
        for event in accumulator.Scalars(tag):
            by_step[int(event.step)] = float(event.value)  # a later write at a step wins
        scalars[tag] = sorted(by_step.items())
    return scalars


def load_run(path: str | Path) -> RunRecord:
    """Read one run folder (a `--log-dir`). Raises RunDirError naming the folder or file."""
    folder = Path(path)
    if not folder.is_dir():
        raise RunDirError(f"{path}: no such run folder")
    if not any(folder.glob(EVENT_FILE_PATTERN)):
        raise RunDirError(f"{path}: no TensorBoard event files ({EVENT_FILE_PATTERN}) in it")
    config = _read_config(folder)
    return RunRecord(
        name=folder.resolve().name, config=config, scalars=_read_scalars(folder), path=folder
    )


def run_labels(runs: Sequence[RunRecord]) -> list[str]:
    """Legend labels: the optimizer name, made unique with the folder name where runs share it."""
    base = [run.optimizer or run.name for run in runs]
    return [
        label if base.count(label) == 1 or label == run.name else f"{label} ({run.name})"
        for label, run in zip(base, runs)
    ]


def _series(run: RunRecord, tag: str) -> Series:
    return run.mean_trust_ratio() if tag == "trust_ratio" else run.scalars.get(tag, [])


def _wide(lines: list[tuple[str, list[float], list[float]]]) -> bool:
    positive = [y for _, _, ys in lines for y in ys if y > 0]
    return bool(positive) and max(positive) > WIDE_RANGE * min(positive)


def _draw(
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    lines: list[tuple[str, list[float], list[float]]],
    log_when_wide: bool = False,
) -> None:
    # The object-oriented API with an explicit Agg canvas: no pyplot state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, xs, ys in lines:
        # Validation is logged once an epoch: markers make the few points readable.
        axes.plot(xs, ys, label=label, marker="o" if len(xs) <= 30 else None, markersize=3)
    if lines:
        axes.legend(fontsize="small")
    else:
        axes.text(
            0.5,
            0.5,
            "no run logged this",
            ha="center",
            va="center",
            transform=axes.transAxes,
            color="grey",
        )
    if log_when_wide and _wide(lines):
        axes.set_yscale("log")  # zeros (warm-up start, end_lr 0) are left out of a log axis
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png")


def _number(value: float | int | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def summary_markdown(runs: Sequence[RunRecord]) -> str:
    """The markdown table written to summary.md (final = value at the highest logged step)."""
    header = (
        "| run | optimizer | global batch | lr | steps | val top-1 (%) | val top-5 (%) "
        "| val loss | train loss |"
    )
    rows = [header, "|" + "---|" * 9]
    for run in runs:
        plan = run.config.get("plan", {})
        cells = [
            run.name.replace("|", "\\|"),
            run.optimizer or "n/a",
            _number(plan.get("global_batch_size"), "d"),
            _number(plan.get("lr"), ".6g"),
            _number(run.last_step(), "d"),
            _number(run.final("val/top1"), ".2f"),
            _number(run.final("val/top5"), ".2f"),
            _number(run.final("val/loss"), ".4f"),
            _number(run.final("train/loss"), ".4f"),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    plots = "\n".join(f"![{title}]({name})" for name, _, title, _ in PLOTS)
    return (
        "# Training runs\n\n" + "\n".join(rows) + "\n\n"
        "Final values are those logged at each run's highest optimizer step; lr is the peak "
        "learning rate after scaling (config.json `plan.lr`).\n\n" + plots + "\n"
    )


def write_report(runs: Sequence[RunRecord], out_dir: str | Path) -> list[Path]:
    """Write the four PNG plots and summary.md into `out_dir`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = run_labels(runs)
    by_epoch = all(run.steps_per_epoch for run in runs)
    xlabel = "epoch" if by_epoch else "optimizer step"
    written = []
    for file_name, tag, title, ylabel in PLOTS:
        lines = []
        for run, label in zip(runs, labels):
            series = _series(run, tag)
            if series:
                scale = run.steps_per_epoch if by_epoch else 1
                lines.append(
                    (label, [step / scale for step, _ in series], [value for _, value in series])
                )
        _draw(out / file_name, title, xlabel, ylabel, lines, tag in LOG_WHEN_WIDE)
        written.append(out / file_name)
    summary = out / SUMMARY_FILE
    summary.write_text(summary_markdown(runs))
    written.append(summary)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lars.report",
        description="Plot and tabulate training runs from their TensorBoard event files.",
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="a --log-dir of pytorch_imagenet_resnet.py (event files, config.json)",
    )
    parser.add_argument(
        "--out", default="report", help="folder for the PNG plots and summary.md (default: report)"
    )
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            "lars.report: error: matplotlib is not installed: pip install matplotlib",
            file=sys.stderr,
        )
        return 2
    try:
        runs = [load_run(path) for path in args.run_dirs]
    except RunDirError as error:
        print(f"lars.report: error: {error}", file=sys.stderr)
        return 2
    try:
        written = write_report(runs, args.out)
    except OSError as error:
        print(f"lars.report: error: --out {args.out}: {error.strerror or error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
