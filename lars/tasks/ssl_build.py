"""The pieces `--task barlowtwins` swaps into `lars.build`: datasets, model, groups, loss.

`lars.build` calls these when `settings.task.task == "barlowtwins"`; the loop (`lars.train`,
`lars.step.optimizer_step`) is the classification mode's, unchanged:

- datasets: the training images through `BarlowTwinsPair` (two views, each a (3, H, W) tensor;
  `lars.data.loaders.RobustDataset` seeds them from (seed, epoch, index)), the validation set
  with the validation crop; `training_images` gives the training set with another transform
  (the k-NN bank, the probe). The pairs are decoded with PIL (no fast-JPEG or DALI path).
- model: `build_barlow_twins` over `--model` (classifier removed, projector `--projector`),
  its BatchNorms over the global batch on several ranks (`convert_batchnorm`).
- groups: with `--norm-bias-lr` (the recipe's, for lars), weights at the scaled `--base-lr` and
  biases and norms at the scaled `--norm-bias-lr` (`bt_param_groups`).
- loss: `BarlowTwinsCriterion`, the cross-correlation summed over ranks by an allreduce that
  autograd sees (`--bt-compat tvlars`: one it does not, the TVLARS repository's gradient / W).
"""

from __future__ import annotations

import os

import torch

from lars.errors import SettingError

__all__ = [
    "bt_criterion",
    "bt_datasets",
    "build_bt_model",
    "is_barlow_twins",
    "norm_bias_groups",
    "split_images",
    "training_images",
]


def is_barlow_twins(settings) -> bool:
    return settings.task.task == "barlowtwins"


def split_images(settings, train_transform, val_transform):
    """(train, val, classes) of the settings' dataset with these transforms (PIL images in)."""
    from lars.data.archives import ARCHIVE_DATASETS, build_archive_datasets
    from lars.data.loaders import check_same_classes, image_folder

    data = settings.data
    if data.dataset in ARCHIVE_DATASETS:
        return build_archive_datasets(data.dataset, data.data_dir, train_transform, val_transform)
    train = image_folder(data.train_dir, "train", train_transform)
    val = image_folder(data.val_dir, "val", val_transform)
    check_same_classes(train, val)
    return train, val, train.classes


def bt_datasets(settings):
    """(pairs of the training images, validation images, classes); FileNotFoundError or
    ValueError naming the bad input (`lars.build.build_datasets` reports it)."""
    from lars.data.loaders import val_transform
    from lars.tasks.bt_augment import BarlowTwinsPair

    data = settings.data
    pairs = BarlowTwinsPair(data.image_size, min_crop_scale=data.min_crop_scale)
    return split_images(settings, pairs, val_transform(data.image_size, data.val_crop_ratio))


def training_images(settings, transform):
    """The training set (as `bt_datasets` reads it) with `transform` instead of the pairs."""
    return split_images(settings, transform, None)[0]


def build_bt_model(settings, device=None, dist=None) -> torch.nn.Module:
    """The Barlow Twins model on `device`, BatchNorm over all ranks of `dist` (None: one)."""
    from lars.tasks.barlowtwins import build_barlow_twins
    from lars.tasks.bt_loss import convert_batchnorm

    try:
        model = build_barlow_twins(
            settings.model.model, settings.task.projector, settings.data.image_size
        )
    except ValueError as error:
        raise SettingError(str(error)) from None
    model = convert_batchnorm(model.to(device or "cpu"), dist)
    model.channels_last = settings.model.channels_last  # each view after the split
    return model


def norm_bias_groups(settings, model, plan) -> list[dict]:
    """The original's two groups, both rates scaled like --base-lr (plan.lr is the weights')."""
    from lars.schedules import scale_lr
    from lars.tasks.barlowtwins import bt_param_groups

    opt = settings.optimizer
    rate = scale_lr(
        settings.task.norm_bias_lr, plan.global_batch_size, opt.lr_reference_batch, opt.lr_scaling
    )
    return bt_param_groups(model, plan.lr, rate, opt.wd)


def bt_criterion(settings, plan, dist):
    from lars.tasks.barlowtwins import BarlowTwinsCriterion
    from lars.tasks.bt_loss import autograd_allreduce_sum

    compat = settings.task.bt_compat == "tvlars"
    allreduce = autograd_allreduce_sum(dist, detached=compat)
    return BarlowTwinsCriterion(settings.task.bt_lambda, allreduce, plan.global_batch_size)


def probe_checkpoint_backbone(path: str) -> dict:
    """The backbone's tensors from a checkpoint of this task (--probe-only); SettingError."""
    from lars.checkpoint import load_checkpoint

    try:
        payload = load_checkpoint(path)
    except ValueError as error:
        raise SettingError(f"--probe-only: {error}") from None
    task = payload.get("config", {}).get("task", "classification")
    prefix = "backbone."
    found = {k[len(prefix) :]: v for k, v in payload["model"].items() if k.startswith(prefix)}
    if task != "barlowtwins" or not found:
        raise SettingError(
            f"--probe-only {os.fspath(path)!r} is a checkpoint of --task {task}, not of "
            "--task barlowtwins"
        )
    return found
