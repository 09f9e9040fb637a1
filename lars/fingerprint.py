"""Run identity: which settings shape a run's trajectory, their fingerprint, and what changed.

A run is what its settings say. Two runs whose trajectory-shaping settings are equal have the same
fingerprint; a checkpoint records the fingerprint and the settings behind it, so a resumed run
can tell whether it continues the same experiment, and if not, name every setting that differs.

    settings = {"model": "resnet50", "base_lr": 2.0, "epochs": 90, "log_dir": "runs/x", ...}
    fingerprint(settings)            # 'sha256 hex' over the trajectory settings only
    short_fingerprint(settings)      # its first 8 hex digits, e.g. for the default log dir
    differing_settings(old, new)     # [("base_lr", 2.0, 8.0), ...], sorted by name
    format_differences(diffs)        # "base_lr 2.0 -> 8.0, wd 5e-05 -> 0.5"

Everything here is a pure function over plain mappings (nested mappings are flattened to
dotted keys), so it works with whatever settings objects the application layer builds
(`dataclasses.asdict` of frozen settings, `vars(namespace)`, a loaded config.json).

Which settings count: every one, except those named in `NOT_TRAJECTORY` (where logs go, how
progress is shown, workers, threads, checkpoint cadence, fault policy, kernels and memory
formats that give the same mathematics). The rule is an exclusion list on purpose: a setting
added later, or renamed, is part of the identity until someone decides it is not, so a forgotten
entry makes a resume refuse loudly instead of silently continuing a different experiment.
Data paths are excluded too: jobs routinely stage the same dataset to a node-local disk under a
new path; the dataset's identity is its name and its size (the plan's image counts).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "FIXED_SETTINGS",
    "NOT_TRAJECTORY",
    "SHORT_LENGTH",
    "differing_settings",
    "fingerprint",
    "format_differences",
    "format_value",
    "run_identity",
    "refused_changes",
    "short_fingerprint",
    "trajectory_settings",
]

SHORT_LENGTH = 8  # 32 bits: a collision between two sweep points is one in 4 billion

# Leaf names (the last component of a dotted key) that do not shape the trajectory.
NOT_TRAJECTORY = frozenset(
    {
        # where things are written or read from, and how the run is shown
        "log_dir",
        "resume",
        "config",
        "train_dir",
        "val_dir",
        "data_dir",
        "log_interval",
        "progress",
        # resources and kernels: the same mathematics, faster or slower
        "workers",
        "threads",
        "backend",
        "no_cuda",
        "device",
        "channels_last",
        "compile",
        "deterministic",
        "val_batch_size",
        # checkpoint cadence, stopping points and fault policy
        "keep_checkpoints",
        "checkpoint_every_steps",
        "max_steps",
        "max_samples",
        "stall_timeout",
        "nonfinite",
        "max_nonfinite",
        "strict_data",
        # modes of the command, not properties of the run
        "dry_run",
        "evaluate",
        "ranks",
        "allow_change",
        "train_images",  # sizes a --dry-run's plan only
        # how a run was launched: the geometry that shapes the trajectory is the global batch
        # and the per-rank micro-batch (BatchNorm's batch), both kept; ranks x accumulation
        # that give the same two are the same run (1 x 8 x 4 and 2 x 8 x 2 reach the same
        # parameters), so a requeue on fewer nodes with more accumulation continues it
        "world_size",
        "batches_per_allreduce",
    }
)

# Settings that cannot change in the middle of a run, with the reason given to the user.
FIXED_SETTINGS = {
    "model": "the checkpoint's weights belong to the old model",
    "dataset": "the classes and the epoch length belong to the old dataset",
    "base_op": "the optimizer state belongs to the old optimizer",
    "optimizer_variant": "the optimizer state belongs to the old variant",
    "bn_bias_separately": "the optimizer's parameter groups would differ",
    "global_batch_size": "the position in the epoch and the step counts would not carry over",
}


def run_identity(settings: Mapping, global_batch_size: int) -> dict[str, Any]:
    """What a run's fingerprint is taken over: its settings (flat or nested) and the global
    batch, which the settings alone do not fix (it depends on the number of ranks). A
    classification run leaves the task's (unused) settings out, as before they existed."""
    from lars.tasks.ssl_config import classification_identity

    return {**classification_identity(dict(settings)), "global_batch_size": global_batch_size}


def _flatten(settings: Mapping, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _canonical(value: Any) -> Any:
    """A JSON value that is equal for equal settings: 2 and 2.0 are one learning rate, a tuple
    and a list of the same numbers one milestone list; other objects by their str()."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        number = float(value)
        return repr(number) if not math.isfinite(number) else number
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    return str(value)


def _switched_off(flat: Mapping) -> frozenset:
    """The settings of a feature that is off (the adaptive batch with test_type none, or not
    recorded): they shape nothing, and leaving them out keeps every earlier fingerprint."""
    from lars.settings import GROUPS

    test = [value for key, value in flat.items() if _leaf(key) == "test_type"]
    return frozenset(GROUPS["adaptive"].split()) if test in ([], ["none"]) else frozenset()


def trajectory_settings(settings: Mapping, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The flattened settings that shape the trajectory, in canonical form, sorted by key.

    Keys starting with an underscore and leaves in `NOT_TRAJECTORY` (or `exclude`) are left out,
    and so are those of the adaptive batch when it is off (`_switched_off`).
    """
    flat = _flatten(settings)
    skip = NOT_TRAJECTORY | frozenset(exclude) | _switched_off(flat)
    return {
        key: _canonical(flat[key])
        for key in sorted(flat)
        if not _leaf(key).startswith("_") and _leaf(key) not in skip
    }


def fingerprint(settings: Mapping, exclude: Iterable[str] = ()) -> str:
    """SHA-256 (hex) of the canonical JSON of `trajectory_settings(settings)`.

    Stable across processes, Python versions and key order (sorted keys, floats by their
    shortest repr); not stable across a rename of a setting, which is the point.
    """
    text = json.dumps(trajectory_settings(settings, exclude), sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def short_fingerprint(settings_or_fingerprint: Mapping | str) -> str:
    """The first `SHORT_LENGTH` hex digits, from settings or from a full fingerprint."""
    if isinstance(settings_or_fingerprint, str):
        return settings_or_fingerprint[:SHORT_LENGTH]
    return fingerprint(settings_or_fingerprint)[:SHORT_LENGTH]


_ABSENT = object()


def differing_settings(
    old: Mapping,
    new: Mapping,
    defaults: Mapping | None = None,
    exclude: Iterable[str] = (),
) -> list[tuple[str, Any, Any]]:
    """Every trajectory setting whose value differs, as (key, old value, new value), by key.

    A key present on one side only differs unless `defaults` gives it the other side's value
    (a checkpoint written before a setting existed ran at that setting's default). A side that
    lacks a key and has no default reports the value `None`.
    """
    a, b = trajectory_settings(old, exclude), trajectory_settings(new, exclude)
    raw_a, raw_b = _flatten(old), _flatten(new)
    fill = trajectory_settings(defaults or {}, exclude)
    found = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key, fill.get(key, _ABSENT)), b.get(key, fill.get(key, _ABSENT))
        if left != right:
            found.append(
                (
                    key,
                    raw_a.get(key) if key in raw_a else None,
                    raw_b.get(key) if key in raw_b else None,
                )
            )
    return found


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}" if value == value and float(f"{value:g}") == value else repr(value)
    if value is None:
        return "(unset)"
    return str(value)


def format_differences(diffs: Iterable[tuple[str, Any, Any]], name=lambda key: key) -> str:
    """'base_lr 2 -> 8, wd 5e-05 -> 0.5'; `name` maps a key to what the user typed (a flag)."""
    return ", ".join(f"{name(k)} {format_value(a)} -> {format_value(b)}" for k, a, b in diffs)


def refused_changes(
    diffs: Iterable[tuple[str, Any, Any]], allowed: Iterable[str]
) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """Split differences into (not allowed, allowed). A difference is allowed when its key (or
    its leaf name) is in `allowed` and it is not in `FIXED_SETTINGS`."""
    allowed = set(allowed)
    kept, refused = [], []
    for diff in diffs:
        key = diff[0]
        ok = (key in allowed or _leaf(key) in allowed) and _leaf(key) not in FIXED_SETTINGS
        (kept if ok else refused).append(diff)
    return refused, kept
