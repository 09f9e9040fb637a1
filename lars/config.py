"""Settings from flags: the --config YAML file and `resolve`, the one place where every default is
decided (each optimizer's own come from its record in `lars.factory`). The flags are declared in
`lars.flags`. `parse_settings(argv)` returns the frozen `lars.settings.Settings` that the training
layer reads; bad values raise `SettingError` naming the flag (`lars.checks`). Nothing here imports
Horovod or touches data.
"""

from __future__ import annotations

import argparse

from lars.checks import allowed_changes, check_data_flags, check_flags
from lars.errors import SettingError
from lars.factory import OPTIMIZER_SPECS
from lars.flags import get_args_parser
from lars.settings import Settings
from lars.tasks.ssl_config import check_task_flags, task_defaults

# Defaults that differ between the embedded sample set (no --train-dir) and real data. The sample
# run must finish in a few minutes on 2 CPU cores; the ImageNet values are those of the seed
# command line (Goyal et al. 2017 / LARS-ImageNet). CIFAR-10/100 (32 px) and Tiny ImageNet
# (64 px): the small-image ResNet, images at native size (NATIVE_IMAGE_SIZE).
_DATASET_DEFAULTS = (
    "model epochs batch_size val_batch_size min_crop_scale hflip warmup_epochs label_smoothing "
    "val_crop_ratio image_size"
).split()


def _defaults(*values) -> dict:
    return dict(zip(_DATASET_DEFAULTS, values))


SAMPLE_DEFAULTS = _defaults("resnet18_small", 4, 32, 128, 0.35, False, 0.5, 0.0, 1.0, 32)
IMAGENET_DEFAULTS = _defaults("resnet50", 90, 32, 32, 0.08, True, 5.0, 0.1, 0.875, 224)
SMALL_IMAGE_DEFAULTS = _defaults("resnet18_small", 90, 128, 256, 0.35, True, 5.0, 0.1, 1.0)
NATIVE_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "tinyimagenet": 64}


def _dataset_defaults(values: dict) -> dict:
    """Sets values["dataset"] to what the data flags mean; returns that dataset's defaults."""
    if values["synthetic"] or values["data_backend"] == "synthetic":
        # --synthetic is the alias of --data-backend synthetic: one setting, one fingerprint.
        values.update(synthetic=True, data_backend="synthetic", dataset="synthetic")
    elif values["dataset"] in (None, "imagefolder"):
        values["dataset"] = "sample" if values["train_dir"] is None else "imagefolder"
    elif values["dataset"] != "imagenet":
        return {**SMALL_IMAGE_DEFAULTS, "image_size": NATIVE_IMAGE_SIZE[values["dataset"]]}
    return SAMPLE_DEFAULTS if values["dataset"] == "sample" else IMAGENET_DEFAULTS


def _optimizer_defaults(spec, values: dict) -> dict:
    """The optimizer record's defaults: its rate, schedule, split and variant (whose own
    defaults, e.g. TVLARS's alpha, the settings then hold as values)."""
    defaults = {k: getattr(spec, k) for k in "base_lr schedule lr_power bn_bias_separately".split()}
    if spec.warmup_epochs is not None:
        defaults["warmup_epochs"] = spec.warmup_epochs
    if spec.variants:
        variant = values["optimizer_variant"] or spec.variants[0]
        defaults["optimizer_variant"] = spec.variants[0]
        if "alpha" in spec.hyperparameters:
            table = getattr(spec.load(), "VARIANT_DEFAULTS", {})
            defaults["tv_alpha"] = table.get(variant, {}).get("alpha", 1.0)
    return defaults


def resolve(flags: dict) -> dict:
    """Every default, decided here once, then every check (`lars.checks`); returns a new dict.

    Order of precedence: command line > --config file > the optimizer's record > the dataset's
    defaults. Defaults that depend on the machine (CUDA, the ranks on this node) are read from
    the launch environment, before any runtime starts. A check that trips over a value the
    user did not give names it as a default (`defaulted`).
    """
    import torch

    from lars.data.fast import default_workers_per_rank
    from lars.data.sample import default_sample_dir
    from lars.distributed import launched_local_size, launched_size
    from lars.plan import default_log_dir

    values = dict(flags)
    check_data_flags(values)
    spec = OPTIMIZER_SPECS[values["base_op"]]
    dataset_defaults = _dataset_defaults(values)
    ranks = (values["ranks"] if values["dry_run"] else None) or launched_size()
    defaults = {
        **dataset_defaults,
        **_optimizer_defaults(spec, values),
        "lr_scaling": "keep",
        "wd": 5e-5,
        "end_lr": 0.0,
        **task_defaults(values, dataset_defaults, ranks),  # the recipe of --task barlowtwins
        "channels_last": torch.cuda.is_available() and not values["no_cuda"],
        "nonfinite": "skip",
        "max_nonfinite": 1 if values["nonfinite"] == "abort" else 20,
        "workers": default_workers_per_rank(launched_local_size()),
    }
    defaulted = frozenset(key for key, value in defaults.items() if values[key] is None)
    values.update({key: defaults[key] for key in defaulted})
    values["allow_change"] = allowed_changes(values["allow_change"])
    if values["dataset"] == "sample":  # built on first use (lars.build.build_datasets)
        root = default_sample_dir()
        values["train_dir"], values["val_dir"] = str(root / "train"), str(root / "val")
    check_flags(values, defaulted)
    check_task_flags(values)
    if values["log_dir"] is None:
        values["log_dir"] = default_log_dir(Settings.from_flat(values), ranks)
    return values


def load_config_file(path: str, parser: argparse.ArgumentParser) -> dict:
    """Defaults from a YAML file, checked against the parser's options and choices."""
    import yaml

    try:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
    except OSError as error:
        raise SettingError(f"--config {path!r}: {error.strerror}") from None
    except yaml.YAMLError as error:
        first = str(error).splitlines()[0]
        raise SettingError(f"--config {path!r} is not valid YAML: {first}") from None
    if not isinstance(values, dict):
        raise SettingError(f"--config {path!r} must hold a mapping of option names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    defaults = {}
    for key, value in values.items():
        dest = str(key).lstrip("-").replace("-", "_")
        action = actions.get(dest)
        if action is None:
            raise SettingError(f"--config {path!r}: unknown option {key!r}")
        if value is not None and action.type is not None and not isinstance(value, bool):
            try:
                value = action.type(value)
            except (TypeError, ValueError):
                raise SettingError(
                    f"--config {path!r}: {key}: {value!r} is not a valid {action.type.__name__}"
                ) from None
        if action.choices is not None and value not in action.choices:
            raise SettingError(
                f"--config {path!r}: {key}: {value!r} is not one of "
                f"{', '.join(map(str, action.choices))}"
            )
        defaults[dest] = value
    return defaults


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and resolve: built-in defaults < --config file < command line. argparse itself
    exits with status 2 on unknown flags or bad types. The result is a fresh namespace of the
    resolved values, for the application layer; the training layer reads `Settings`."""
    parser = get_args_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config_file(known.config, parser))
    return argparse.Namespace(**resolve(vars(parser.parse_args(argv))))


def parse_settings(argv: list[str] | None = None) -> Settings:
    return Settings.from_flat(vars(parse_args(argv)))
