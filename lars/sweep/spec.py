"""Sweep specs: a YAML file that names a grid (and explicit cases) over training flags.

    name: mini-claim                      # default: the file name without .yaml
    flags: {model: tinycnn, epochs: 30}   # every point
    grid: {base-lr: [1, 2, 4]}            # cartesian product over these flags
    cases:                                # explicit list, each crossed with the grid
      - {label: LARS (no warm-up), flags: {base-op: lars, warmup-epochs: 0}}
      - {label: LAMB, flags: {base-op: lamb}, grid: {base-lr: [0.005, 0.01, 0.02]}}
    ranks: 1                              # ranks per run (or a list: one more grid axis)
    seeds: [1, 2, 3]                      # repeats (or `repeats: 3`, seeds seed..seed+2)
    table: {columns: base-lr, column-by: position, baseline: 1}

Points = cases x grid (a case's own grid replaces the global one key by key) x ranks x seeds.
Flag names are the trainer's long options with or without dashes (`base-lr`, `base_lr`,
`--base-lr`); values are converted with the trainer's own argparse types and checked against its
choices. Strings may hold `${VAR}` or `${VAR:-default}` (data roots differ per machine).
`pending: "reason"` marks a spec that cannot run yet (a flag or model still to come).
Any problem raises SpecError with the spec file, the point and the flag in its message.
"""

from __future__ import annotations

import argparse
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lars.sweep.flags import FlagTable, expand_env

# Flags the sweep decides itself: where a point logs, how it resumes, how many ranks it has.
RESERVED = {
    "log_dir": "the sweep gives every point its own log dir",
    "resume": "the sweep resumes interrupted points itself (--resume auto)",
    "dry_run": "use `python -m lars.sweep SPEC --dry-run`",
    "ranks": "use the spec's `ranks:` key",
    "config": "put the file's keys under `flags:`",
    "help": "not a training flag",
}
TOP_KEYS = {
    "name",
    "description",
    "pending",
    "out",
    "flags",
    "grid",
    "cases",
    "ranks",
    "seeds",
    "repeats",
    "table",
    "plots",
    "slurm",
    "train-images",
}
CASE_KEYS = {"label", "flags", "grid", "ranks"}


class SpecError(ValueError):
    """A spec that cannot be run; the message names the file, the point and the flag."""


@dataclass
class Point:
    """One run of a sweep: its flags (canonical long options -> typed values) and ranks."""

    index: int
    label: str  # the case label, or "" without cases
    flags: dict[str, Any]
    ranks: int
    swept: dict[str, Any]  # the grid values of this point (flag -> value), ranks included
    column_position: dict[str, int] = field(default_factory=dict)  # grid flag -> index

    @property
    def seed(self) -> Any:
        return self.flags.get("--seed")

    def describe(self) -> str:
        parts = [self.label] if self.label else []
        parts += [f"{flag.lstrip('-')}={value}" for flag, value in self.swept.items()]
        if self.seed is not None and "--seed" not in self.swept:
            parts.append(f"seed={self.seed}")
        return f"point {self.index} ({' '.join(parts)})"


@dataclass
class Spec:
    path: Path
    name: str
    description: str
    pending: str | None
    out: Path
    points: list[Point]
    table: dict
    plots: dict
    slurm: dict
    train_images: int | None


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _int_list(value: Any, where: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise SpecError(f"{where} must be a whole number >= 1 or a non-empty list of them")
    return values


def _seeds(doc: dict, where: str) -> list[int] | None:
    if "seeds" in doc and "repeats" in doc:
        raise SpecError(f"{where}: give `seeds:` or `repeats:`, not both")
    if "seeds" in doc:
        seeds = doc["seeds"] if isinstance(doc["seeds"], list) else [doc["seeds"]]
        if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
            raise SpecError(f"{where}: seeds must be a non-empty list of whole numbers")
        if len(set(seeds)) != len(seeds):
            raise SpecError(f"{where}: seeds repeat a value")
        return seeds
    if "repeats" in doc:
        (count,) = _int_list(doc["repeats"], f"{where}: repeats")
        first = doc.get("flags", {}).get("seed", 42) if isinstance(doc.get("flags"), dict) else 42
        return [int(first) + i for i in range(count)]
    return None


def load_spec(path: str | Path, parser: argparse.ArgumentParser) -> Spec:
    """Read and expand a spec; every flag and value is checked against `parser`."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as error:
        raise SpecError(f"{path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: a spec is a mapping (name, flags, grid, cases, ...)")
    unknown = sorted(set(doc) - TOP_KEYS)
    if unknown:
        raise SpecError(
            f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(TOP_KEYS))})"
        )
    table = FlagTable(parser)
    try:
        points = _expand(path, doc, table)
    except SpecError as error:
        if doc.get("pending"):  # e.g. a flag that does not exist yet: say why first
            raise SpecError(f"{path}: pending: {str(doc['pending']).strip()} ({error})") from None
        raise
    _check_sections(path, doc)
    _check_columns(path, doc.get("table") or {}, points)
    train_images = doc.get("train-images")
    if train_images is not None:
        (train_images,) = _int_list(train_images, f"{path}: train-images")
    return Spec(
        path=path,
        name=str(doc.get("name") or path.stem),
        description=str(doc.get("description") or "").strip(),
        pending=str(doc["pending"]).strip() if doc.get("pending") else None,
        out=Path(expand_env(str(doc.get("out") or os.path.join("runs", "sweeps")))),
        points=points,
        table=_mapping(doc.get("table"), f"{path}: table"),
        plots=_mapping(doc.get("plots"), f"{path}: plots"),
        slurm=_mapping(doc.get("slurm"), f"{path}: slurm"),
        train_images=train_images,
    )


def _check_columns(path: Path, table: dict, points: list[Point]) -> None:
    """table.columns names a swept axis (a flag with or without dashes, a named axis, `ranks`)
    or `case` (the case labels)."""
    name = table.get("columns")
    if name is None or name == "case":
        return
    axes = {key for point in points for key in point.swept}
    if str(name) not in axes and "--" + str(name).lstrip("-").replace("_", "-") not in axes:
        shown = ", ".join(sorted(a.lstrip("-") for a in axes)) or "none"
        raise SpecError(f"{path}: table: columns {name!r} is not a swept axis (swept: {shown})")


def _check_sections(path: Path, doc: dict) -> None:
    """table: and slurm: hold only what the report and the array submission read."""
    table = _mapping(doc.get("table"), f"{path}: table")
    unknown = sorted(set(table) - {"columns", "column-by", "baseline"})
    if unknown:
        raise SpecError(f"{path}: table: unknown key {unknown[0]!r} (columns, column-by, baseline)")
    if table.get("column-by", "value") not in ("value", "position"):
        raise SpecError(f"{path}: table: column-by must be value or position")
    slurm = _mapping(doc.get("slurm"), f"{path}: slurm")
    unknown = sorted(set(slurm) - {"parallel", "gpus-per-node", "sbatch-args"})
    if unknown:
        raise SpecError(
            f"{path}: slurm: unknown key {unknown[0]!r} (parallel, gpus-per-node, sbatch-args)"
        )
    for key in ("parallel", "gpus-per-node"):
        if key in slurm:
            _int_list(slurm[key], f"{path}: slurm: {key}")
    args = slurm.get("sbatch-args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise SpecError(f"{path}: slurm: sbatch-args must be a list of strings")


def _canonical_flags(table: FlagTable, flags: dict, where: str) -> dict[str, Any]:
    out = {}
    for name, value in flags.items():
        action = table.action(name)
        if action is None:
            raise SpecError(f"{where}: --{str(name).lstrip('-')}: not a flag of the trainer")
        if action.dest in RESERVED:
            raise SpecError(f"{where}: {table.option(action)}: {RESERVED[action.dest]}")
        try:
            out[table.option(action)] = table.typed(action, value)
        except ValueError as error:
            raise SpecError(f"{where}: {table.option(action)}: {error}") from None
    return out


@dataclass(frozen=True)
class FlagSet:
    """One value of a named grid axis that sets several flags together (a batch geometry:
    micro-batch and accumulation; an optimizer with its own lr and schedule)."""

    label: Any  # what the table shows; a number stays a number (a plot axis)
    flags: tuple  # ((option, typed value), ...)

    def __str__(self) -> str:
        return str(self.label)


def _flag_set(table: FlagTable, name: str, value: dict, where: str) -> FlagSet:
    value = dict(value)
    label = value.pop("label", None)
    flags = _canonical_flags(table, value, f"{where}: {name}")
    if not flags:
        raise SpecError(f"{where}: {name}: a value sets no flags")
    if label is None:
        label = " ".join(f"{k.lstrip('-')}={v}" for k, v in flags.items())
    if not isinstance(label, (int, float)) or isinstance(label, bool):
        label = str(label)
    return FlagSet(label=label, flags=tuple(flags.items()))


def _grid(table: FlagTable, grid: dict, where: str) -> dict[str, list]:
    """Axis -> values. An axis is a trainer flag with a list of values, or any other name whose
    values are mappings of flags (each with an optional `label`: its name in the table)."""
    out: dict[str, list] = {}
    for name, values in grid.items():
        values = values if isinstance(values, list) else [values]
        if values and all(isinstance(v, dict) for v in values):
            if table.action(name) is not None:
                raise SpecError(f"{where}: {name}: a flag's grid takes values, not mappings")
            typed = [_flag_set(table, str(name), v, where) for v in values]
            flag = str(name)
        else:
            probe = values[0] if values else 0
            flag = next(iter(_canonical_flags(table, {name: probe}, where)), "")
            if not values:
                raise SpecError(
                    f"{where}: {flag}: empty list of values (an empty grid has no points)"
                )
            typed = [_canonical_flags(table, {name: v}, where)[flag] for v in values]
        if len(set(map(repr, typed))) != len(typed) or len(set(map(str, typed))) != len(typed):
            raise SpecError(f"{where}: {flag}: the grid repeats a value")
        out[flag] = typed
    return out


def _cases(path: Path, doc: dict) -> list[dict]:
    cases = doc.get("cases")
    if cases is None:
        return [{}]
    if not isinstance(cases, list) or not cases:
        raise SpecError(f"{path}: cases must be a non-empty list (or left out)")
    for i, case in enumerate(cases):
        if not isinstance(case, dict):
            raise SpecError(f"{path}: case {i + 1} must be a mapping (label, flags, grid, ranks)")
        unknown = sorted(set(case) - CASE_KEYS)
        if unknown:
            raise SpecError(f"{path}: case {i + 1}: unknown key {unknown[0]!r}")
    return cases


def _combine(flags: dict, names: list[str], values: tuple, where: str) -> tuple[dict, dict]:
    """One grid combination's flags (FlagSet axes merged in) and its swept values by axis."""
    point_flags, swept = dict(flags), {}
    for name, value in zip(names, values):
        pairs = value.flags if isinstance(value, FlagSet) else ((name, value),)
        for option, typed in pairs:
            if option in point_flags:
                raise SpecError(f"{where}: {option}: set both by {name} and by another axis/flag")
            point_flags[option] = typed
        swept[name] = value.label if isinstance(value, FlagSet) else value
    return point_flags, swept


def _expand(path: Path, doc: dict, table: FlagTable) -> list[Point]:
    """cases x grid x ranks x seeds, in that order (seeds innermost)."""
    where = str(path)
    common = _canonical_flags(table, _mapping(doc.get("flags"), f"{where}: flags"), where)
    grid = _grid(table, _mapping(doc.get("grid"), f"{where}: grid"), where)
    seeds = _seeds(doc, where)
    if seeds is not None and ("--seed" in grid or "--seed" in common):
        raise SpecError(f"{where}: --seed: given both in seeds/repeats and in flags or grid")
    points: list[Point] = []
    seen: dict[str, int] = {}
    for number, case in enumerate(_cases(path, doc), start=1):
        here = f"{where}: case {number}"
        label = str(case.get("label") or "")
        flags = {**common, **_canonical_flags(table, _mapping(case.get("flags"), here), here)}
        axes = {**grid, **_grid(table, _mapping(case.get("grid"), here), here)}
        clash = sorted(set(flags) & set(axes))
        if clash:
            raise SpecError(f"{here}: {clash[0]}: given both as a flag and as a grid axis")
        ranks = _int_list(case.get("ranks", doc.get("ranks", 1)), f"{here}: ranks")
        names = list(axes)
        for values in itertools.product(*(axes[n] for n in names)):
            for rank_count in ranks:
                for seed in seeds if seeds is not None else [None]:
                    point_flags, swept = _combine(flags, names, values, here)
                    if seed is not None:
                        point_flags["--seed"] = seed
                    if len(ranks) > 1:
                        swept["ranks"] = rank_count
                    point = Point(
                        index=len(points) + 1,
                        label=label,
                        flags=point_flags,
                        ranks=rank_count,
                        swept=swept,
                        column_position={n: axes[n].index(v) for n, v in zip(names, values)},
                    )
                    key = repr((sorted(point_flags.items()), rank_count))
                    if key in seen:
                        raise SpecError(
                            f"{where}: {point.describe()} repeats point {seen[key]} "
                            "(the same flags and ranks)"
                        )
                    seen[key] = point.index
                    points.append(point)
    return points
