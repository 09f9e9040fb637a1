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


def text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a name, got {value!r}")
    return value


def betas(name: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    return (unit_interval_open(f"{name}[0]", value[0]), unit_interval_open(f"{name}[1]", value[1]))


Check = Callable[[str, Any], Any]

# Optimizer keyword arguments (lars.factory's names).
HYPERPARAMETER_CHECKS: dict[str, Check] = {
    **dict.fromkeys(
        "lr weight_decay eps lmbda min_scale lr_decay initial_accumulator_value".split(),
        non_negative,
    ),
    **dict.fromkeys(("nesterov", "amsgrad", "centered"), flag),
    **dict.fromkeys(("dampening", "rmsprop_alpha"), unit_interval_closed),
    "momentum": unit_interval_open,
    "betas": betas,
    "trust_coefficient": positive,
    "alpha": positive,  # TVLARS: phi <= 1 / alpha + min_scale, so alpha = 0 is unbounded
    "delay_steps": non_negative,  # optimizer steps; phi is continuous, so a fraction is fine
    "variant": text,  # the class checks the name against its VARIANTS
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
    "optimizer_variant": "variant",
}

_POSITIVE = (
    "epochs batch_size val_batch_size batches_per_allreduce lr_reference_batch log_interval "
    "keep_checkpoints max_steps checkpoint_every_steps max_nonfinite ranks clip_grad_norm "
    "lr_power base_lr train_images max_samples"
).split()
FLAG_CHECKS: dict[str, Check] = {
    **{name: positive for name in _POSITIVE},
    **{name: non_negative for name in ("warmup_epochs", "end_lr", "seed")},
    # Values a machine cannot honour fail here, not as a traceback half-way through start-up.
    "threads": partial(number, low=0.0, high=4096.0, open_low=True, open_high=False),
    "workers": partial(number, low=0.0, high=1024.0, open_high=False),
    "image_size": partial(number, low=0.0, high=8192.0, open_low=True, open_high=False),
    "stall_timeout": partial(number, low=0.0, high=1e7, open_low=True, open_high=False),
    **{f: HYPERPARAMETER_CHECKS[h] for f, h in FLAG_TO_HYPERPARAMETER.items()},
    "val_crop_ratio": fraction,
    "min_crop_scale": fraction,
    "label_smoothing": unit_interval_open,
}


def _flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _named(dest: str, values: dict, defaulted=frozenset()) -> str:
    """'--epochs 1' for a value the user gave, 'the default --epochs 90' for one they did not."""
    value = values[dest]
    shown = f"{_flag_name(dest)} {value:{'g' if isinstance(value, float) else ''}}"
    return f"the default {shown}" if dest in defaulted else shown


def check_flags(values: dict, defaulted=frozenset()) -> None:
    """Every value and combination of the resolved flags; SettingError names the flag.

    `defaulted` holds the flags whose value is a default the user did not choose: a conflict
    involving one names it as a default, with the flag that changes it."""
    from lars.models import available_models

    for dest, check in FLAG_CHECKS.items():
        if values.get(dest) is not None:
            try:
                check(_flag_name(dest), values[dest])
            except ValueError as error:
                raise SettingError(str(error)) from None
    _check_schedule(values, defaulted)
    _check_optimizer(values)
    _check_adasum(values, defaulted)
    _check_modes(values)
    _check_adaptive_batch(values)
    if values["model"] not in available_models():
        raise SettingError(
            f"--model {values['model']!r} is not a torchvision classification model nor "
            "one of resnet18_small, resnet34_small, resnet50_small, tinycnn, alexnet_bn"
        )
    _check_paths(values)


def _check_adaptive_batch(values: dict) -> None:
    from lars.adaptive.flags import check_flags as check_adaptive_flags
    from lars.distributed import launched_size

    ranks = (values["ranks"] if values["dry_run"] else None) or launched_size()
    check_adaptive_flags(values, ranks)


def _check_schedule(values: dict, defaulted) -> None:
    from lars.factory import OPTIMIZER_SPECS

    spec = OPTIMIZER_SPECS[values["base_op"]]
    if spec.schedules and values["schedule"] not in spec.schedules:
        raise SettingError(
            f"--base-op {spec.name} takes no --schedule {values['schedule']}: phi is its "
            "schedule (use --schedule none)"
        )
    warmup, epochs = _named("warmup_epochs", values, defaulted), _named("epochs", values, defaulted)
    if values["schedule"] == "none" and values["warmup_epochs"] > 0:
        schedule = _named("schedule", values, defaulted)
        raise SettingError(
            f"{schedule} has no warm-up, but {warmup} asks for one: add --warmup-epochs 0, "
            "or use --schedule constant"
        )
    if values["warmup_epochs"] > values["epochs"]:
        fix = "--warmup-epochs" if "warmup_epochs" in defaulted else "--epochs"
        raise SettingError(f"{warmup} is longer than {epochs}: set {fix} to fit")
    delay = values.get("tv_delay_epochs")
    if values["base_op"] == "tvlars" and delay is not None and delay > values["epochs"]:
        raise SettingError(
            f"--tv-delay-epochs {delay:g} is longer than {epochs}: phi would not start to "
            "decay within the run"
        )


def _check_optimizer(values: dict) -> None:
    from lars.factory import OPTIMIZER_SPECS

    spec, variant = OPTIMIZER_SPECS[values["base_op"]], values.get("optimizer_variant")
    if variant is not None and not spec.variants:
        with_variants = ", ".join(s.name for s in OPTIMIZER_SPECS.values() if s.variants)
        raise SettingError(
            f"--optimizer-variant {variant}: --base-op {spec.name} has no variants "
            f"(only {with_variants} do)"
        )
    if variant is not None and variant not in spec.variants:
        raise SettingError(
            f"--optimizer-variant {variant!r} is not a variant of {spec.name}: "
            f"{spec.variants[0]} (the default), {', '.join(spec.variants[1:])}"
        )


# Nothing can come between Adasum's gradients and its update (lars.step's docstring).
_ADASUM_WHY = "Horovod's Adasum applies each update inside the backward pass"


def _check_adasum(values: dict, defaulted) -> None:
    if not values["use_adasum"]:
        return
    if values["backend"] == "torch":
        raise SettingError("--use-adasum needs --backend horovod (or auto with Horovod installed)")
    if values["clip_grad_norm"] is not None:
        raise SettingError(
            f"--use-adasum with --clip-grad-norm: {_ADASUM_WHY}, before the gradients could "
            "be clipped; drop one of them"
        )
    if values["amp"] == "fp16":
        raise SettingError(
            f"--use-adasum with --amp fp16: {_ADASUM_WHY}, before the gradients are "
            "unscaled; use --amp bf16 or --amp none"
        )
    if values["nonfinite"] == "skip":
        raise SettingError(
            f"--use-adasum with {_named('nonfinite', values, defaulted)}: {_ADASUM_WHY}, so a "
            "non-finite step cannot be skipped; add --nonfinite abort"
        )
    if values["max_nonfinite"] != 1:
        raise SettingError(
            f"--use-adasum with --max-nonfinite {values['max_nonfinite']}: {_ADASUM_WHY}, so "
            "the first non-finite step must stop the run; drop --max-nonfinite"
        )


def _check_modes(values: dict) -> None:
    if values.get("train_images") is not None and not values["dry_run"]:
        raise SettingError(
            "--train-images sizes a --dry-run's plan; a run counts its training set itself"
        )
    if values["evaluate"] and values["dry_run"]:
        raise SettingError("--evaluate and --dry-run: choose one")
    if values["evaluate"] and values["resume"] == "none":
        raise SettingError(
            "--evaluate scores a checkpoint: --resume auto (the newest in --log-dir) or a path, "
            "not none"
        )
    if values.get("data_backend") == "dali-gpu" and values.get("no_cuda"):
        raise SettingError(
            "--data-backend dali-gpu decodes on the GPU, which --no-cuda turns off: "
            "use --data-backend dali-cpu or pytorch"
        )
    if values["dataset"] == "imagenet" and values["train_dir"] is None and not values["dry_run"]:
        raise SettingError(
            "--dataset imagenet needs --train-dir and --val-dir (ImageFolder trees of "
            "ImageNet-1k; only a --dry-run plans without them)"
        )


FOLDER_DATASETS = (None, "imagefolder", "imagenet")  # ImageFolder trees: --train-dir, --val-dir


def _without_data(values: dict) -> bool:
    """A dry run sized by --train-images (or ImageNet's known size) reads no data folder."""
    return bool(values["dry_run"]) and (
        values.get("train_images") is not None or values["dataset"] == "imagenet"
    )


def check_data_flags(values: dict) -> None:
    """Which data flags go together; run before the dataset's defaults are chosen."""
    dataset, archive = values["dataset"], values["dataset"] not in FOLDER_DATASETS
    train_dir, val_dir, data_dir = values["train_dir"], values["val_dir"], values["data_dir"]
    if archive and (train_dir or val_dir):
        raise SettingError(f"--dataset {dataset} reads --data-dir; drop --train-dir/--val-dir")
    if archive and not data_dir:
        raise SettingError(f"--dataset {dataset} needs --data-dir (the folder holding its archive)")
    if archive and not os.path.isdir(data_dir) and not _without_data(values):
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
    if values["dataset"] in FOLDER_DATASETS and not _without_data(values):
        for dest in ("train_dir", "val_dir"):
            if values[dest] is not None and not os.path.isdir(values[dest]):
                raise SettingError(f"{_flag_name(dest)} {values[dest]!r} is not a directory")
    if values["log_dir"] is not None:
        _check_folder_to_be(values["log_dir"])
    if values["resume"] not in ("auto", "none") and not os.path.isfile(values["resume"]):
        raise SettingError(f"--resume {values['resume']!r}: no such checkpoint file")


def _check_folder_to_be(log_dir: str) -> None:
    """--log-dir is a folder, or can become one: its nearest existing ancestor is a folder."""
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise SettingError(f"--log-dir {log_dir!r} exists and is not a directory")
    ancestor = os.path.dirname(os.path.abspath(log_dir))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise SettingError(f"--log-dir {log_dir!r}: {ancestor!r} is a file, not a directory")


def allowed_changes(text: str | None) -> tuple[str, ...]:
    """--allow-change's flag names as settings names (`base-lr`, `--base-lr`, `base_lr`)."""
    from lars.fingerprint import FIXED_SETTINGS, NOT_TRAJECTORY
    from lars.settings import GROUPS

    if not text:
        return ()
    known = {name for names in GROUPS.values() for name in names.split()} - NOT_TRAJECTORY
    names = []
    for item in text.split(","):
        dest = item.strip().lstrip("-").replace("-", "_")
        if dest in FIXED_SETTINGS:
            raise SettingError(
                f"--allow-change {item.strip()}: {_flag_name(dest)} cannot change in the middle "
                f"of a run ({FIXED_SETTINGS[dest]}); start a new run (--resume none or "
                "another --log-dir)"
            )
        if dest not in known:
            raise SettingError(
                f"--allow-change: unknown setting {item.strip()!r} (name the flags whose new "
                "values should apply, e.g. --allow-change epochs,base-lr)"
            )
        names.append(dest)
    return tuple(dict.fromkeys(names))
