"""The numbers a run derives from its flags and world size, decided before any training."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.nn as nn

from lars.config import UsageError
from lars.data.loaders import DataConfig
from lars.factory import build_optimizer
from lars.param_groups import param_groups
from lars.schedules import STEP_DECAY_EPOCHS, epochs_to_steps, scale_lr


@dataclass
class RunPlan:
    """Saved in config.json and printed at start-up."""

    world_size: int
    global_batch_size: int
    lr: float
    train_images: int
    val_images: int
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    tv_delay_steps: int


def plan_run(args, world_size: int, train_images: int, val_images: int) -> RunPlan:
    """Global batch, scaled LR and step counts. An epoch is `steps_per_epoch` whole global
    batches: DistributedSampler gives each rank ceil(N / W) samples, the loader drops the last
    partial micro-batch, and the micro-batches that would not fill a group of k are dropped."""
    per_rank = -(-train_images // world_size)
    micro = per_rank // args.batch_size
    steps = micro // args.batches_per_allreduce
    global_batch = args.batch_size * world_size * args.batches_per_allreduce
    if steps == 0:
        raise UsageError(
            f"the global batch ({args.batch_size} x {world_size} ranks x "
            f"{args.batches_per_allreduce} = {global_batch}) is larger than the training set "
            f"({train_images} images): lower --batch-size or --batches-per-allreduce"
        )
    return RunPlan(
        world_size=world_size,
        global_batch_size=global_batch,
        lr=scale_lr(args.base_lr, global_batch, args.lr_reference_batch, args.lr_scaling),
        train_images=train_images,
        val_images=val_images,
        micro_batches_per_epoch=micro,
        steps_per_epoch=steps,
        total_steps=steps * args.epochs,
        warmup_steps=epochs_to_steps(args.warmup_epochs, steps),
        tv_delay_steps=epochs_to_steps(args.tv_delay_epochs, steps),
    )


def step_milestones(plan: RunPlan) -> list[int]:
    """The step schedule's decay points (epochs 30/60/80 of Goyal et al.) in optimizer steps."""
    return [plan.steps_per_epoch * epoch for epoch in STEP_DECAY_EPOCHS]


def default_log_dir(args, global_batch: int) -> str:
    """runs/<dataset>-<model>-<optimizer>-gb<global batch>: the same command resumes itself."""
    return os.path.join("runs", f"{args.dataset}-{args.model}-{args.base_op}-gb{global_batch}")


def data_config(args, workers: int) -> DataConfig:
    return DataConfig(
        train_dir=args.train_dir,
        val_dir=args.val_dir,
        synthetic=args.synthetic,
        image_size=args.image_size,
        min_crop_scale=args.min_crop_scale,
        hflip=args.hflip,
        batch_size=args.batch_size,
        val_batch_size=args.val_batch_size,
        workers=workers,
        seed=args.seed,
        strict_data=args.strict_data,
        dataset=args.dataset,
        data_dir=args.data_dir,
        val_crop_ratio=args.val_crop_ratio,
        fast_jpeg=args.fast_jpeg,
    )


def make_optimizer(args, model: nn.Module, plan: RunPlan):
    """The optimizer of --base-op over one group, or (--bn-bias-separately) the decayed and
    adapted weights plus a group of biases and normalisation parameters without either."""
    if args.bn_bias_separately:
        groups = param_groups(model, args.wd)
    else:
        groups = [
            {"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": args.wd}
        ]
    optimizer = build_optimizer(
        args.base_op,
        groups,
        lr=plan.lr,
        momentum=args.momentum,
        weight_decay=args.wd,
        trust_coefficient=args.trust_coefficient,
        lmbda=args.lmbda,
        alpha=args.tv_alpha,
        delay_steps=plan.tv_delay_steps,
        min_scale=args.tv_min_scale,
    )
    return optimizer, groups
