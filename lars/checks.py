"""Every argument check of the training layer, in one place.

The value checks (`non_negative`, `unit_interval_open`, ...) take the name to report and raise
`ValueError("<name> must ..., got <value>")`. `lars.factory` applies them to optimizer keyword
arguments under their own names (`momentum`); `check_flags` applies the same functions to the
resolved command-line values under the flag's name (`--momentum`), so one bad value gets one
check and one message wherever it enters.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import partial
from typing import Any

from lars.errors import SettingError


def number(
    name: str, value: Any, low: float, high: float = math.inf, *, open_low=False, open_high=True
):
    """`value` as a float in [low, high) (brackets per `open_low`/`open_high`); finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (math.isfinite(value) and above and below):
        if high == math.inf:
            raise ValueError(f"{name} must be {'>' if open_low else '>='} {low:g}, got {value}")
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


non_negative = partial(number, low=0.0)
positive = partial(number, low=0.0, open_low=True)
unit_interval_open = partial(number, low=0.0, high=1.0)  # [0, 1)
unit_interval_closed = partial(number, low=0.0, high=1.0, open_high=False)  # [0, 1]
fraction = partial(number, low=0.0, high=1.0, open_low=True, open_high=False)  # (0, 1]


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def betas(name: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    return (unit_interval_open(f"{name}[0]", value[0]), unit_interval_open(f"{name}[1]", value[1]))


Check = Callable[[str, Any], Any]

# Optimizer keyword arguments (lars.factory's names).
HYPERPARAMETER_CHECKS: dict[str, Check] = {
    "lr": non_negative,
    "momentum": unit_interval_open,
    "weight_decay": non_negative,
    "trust_coefficient": positive,
    "eps": non_negative,
    "nesterov": flag,
    "lmbda": non_negative,
    "alpha": positive,  # TVLARS: phi <= 1 / alpha + min_scale, so alpha = 0 is unbounded
    "delay_steps": non_negative,  # optimizer steps; phi is continuous, so a fraction is fine
    "min_scale": non_negative,
    "betas": betas,
    "dampening": unit_interval_closed,
    "amsgrad": flag,
    "lr_decay": non_negative,
    "initial_accumulator_value": non_negative,
    "rmsprop_alpha": unit_interval_closed,
    "centered": flag,
}

# The flags that become an optimizer keyword argument (see lars.factory.OPTIMIZER_SPECS).
FLAG_TO_HYPERPARAMETER = {
    "momentum": "momentum",
    "wd": "weight_decay",
    "trust_coefficient": "trust_coefficient",
    "lmbda": "lmbda",
    "tv_alpha": "alpha",
    "tv_delay_epochs": "delay_steps",
    "tv_min_scale": "min_scale",
}

_POSITIVE = (
    "epochs batch_size val_batch_size batches_per_allreduce image_size lr_reference_batch "
    "log_interval keep_checkpoints max_steps threads checkpoint_every_steps max_nonfinite "
    "stall_timeout ranks clip_grad_norm lr_power"
).split()
FLAG_CHECKS: dict[str, Check] = {
    **{name: positive for name in _POSITIVE},
    **{name: non_negative for name in ("base_lr", "warmup_epochs", "end_lr", "workers")},
    **{f: HYPERPARAMETER_CHECKS[h] for f, h in FLAG_TO_HYPERPARAMETER.items()},
    "val_crop_ratio": fraction,
    "min_crop_scale": fraction,
    "label_smoothing": unit_interval_open,
}


def _flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_flags(values: dict) -> None:
    """Every value and combination of the resolved flags; SettingError names the flag."""
    from lars.factory import OPTIMIZER_SPECS
    from lars.models import available_models

    for dest, check in FLAG_CHECKS.items():
        if values.get(dest) is not None:
            try:
                check(_flag_name(dest), values[dest])
            except ValueError as error:
                raise SettingError(str(error)) from None
    spec = OPTIMIZER_SPECS[values["base_op"]]
    if spec.schedules and values["schedule"] not in spec.schedules:
        raise SettingError(
            f"--base-op {spec.name} takes no --schedule {values['schedule']}: phi is its "
            "schedule (use --schedule none)"
        )
    if values["schedule"] == "none" and values["warmup_epochs"] > 0:
        raise SettingError(
            "--schedule none has no warm-up: use --schedule constant with "
            f"--warmup-epochs {values['warmup_epochs']}, or --warmup-epochs 0"
        )
    if values["warmup_epochs"] > values["epochs"]:
        raise SettingError(
            f"--warmup-epochs {values['warmup_epochs']} is longer than --epochs {values['epochs']}"
        )
    if values["model"] not in available_models():
        raise SettingError(
            f"--model {values['model']!r} is not a torchvision classification model nor "
            "one of resnet18_small, resnet34_small, resnet50_small, tinycnn"
        )
    _check_paths(values)


def check_data_flags(values: dict) -> None:
    """Which data flags go together; run before the dataset's defaults are chosen."""
    archive = values["dataset"] not in (None, "imagefolder")
    train_dir, val_dir, data_dir = values["train_dir"], values["val_dir"], values["data_dir"]
    if archive and (train_dir or val_dir):
        raise SettingError(
            f"--dataset {values['dataset']} reads --data-dir; drop --train-dir/--val-dir"
        )
    if archive and not data_dir:
        raise SettingError(
            f"--dataset {values['dataset']} needs --data-dir (the folder holding its archive)"
        )
    if archive and not os.path.isdir(data_dir):
        raise SettingError(f"--data-dir {data_dir!r} is not a directory")
    if not archive and data_dir:
        raise SettingError(
            "--data-dir goes with --dataset cifar10|cifar100|tinyimagenet; "
            "ImageFolder trees take --train-dir and --val-dir"
        )
    if train_dir is None and val_dir is not None:
        raise SettingError("--val-dir was given without --train-dir")
    if train_dir is not None and val_dir is None and not values["synthetic"]:
        raise SettingError("--train-dir needs --val-dir (an ImageFolder with the same classes)")


def _check_paths(values: dict) -> None:
    if values["dataset"] == "imagefolder":
        for dest in ("train_dir", "val_dir"):
            if not os.path.isdir(values[dest]):
                raise SettingError(f"{_flag_name(dest)} {values[dest]!r} is not a directory")
    log_dir = values["log_dir"]
    if log_dir is not None and os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise SettingError(f"--log-dir {log_dir!r} exists and is not a directory")
    if values["resume"] not in ("auto", "none") and not os.path.isfile(values["resume"]):
        raise SettingError(f"--resume {values['resume']!r}: no such checkpoint file")
