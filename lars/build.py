"""The `build_*` functions: from settings (and the plan) to the run's pieces.

Training (`lars.train.build_run`) and `--dry-run` (`lars.dryrun`) call the same functions, so the
plan a dry run prints is the one a run trains with.
"""

from __future__ import annotations

import functools
import os
from dataclasses import fields

import torch

from lars.checks import FLAG_TO_HYPERPARAMETER
from lars.data.loaders import DataConfig, Loaders
from lars.errors import DataError
from lars.factory import OPTIMIZER_SPECS
from lars.factory import build_optimizer as build_optimizer_by_name
from lars.param_groups import param_groups
from lars.schedules import build_scheduler as build_closed_form_scheduler
from lars.step import StepContext

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def data_config(settings, workers: int, device_id: int | None = None) -> DataConfig:
    """DataConfig's fields are flag names; --data-backend is its `backend`."""
    flat, names = settings.flat(), {f.name for f in fields(DataConfig)}
    # Unreadable files always come back as skipped samples; --strict-data stops the run in the
    # training process (lars.train.check_strict_data), where the path is known.
    # (--backend is the distributed runtime's, not the data's.)
    known = {k: v for k, v in flat.items() if k in names - {"strict_data", "workers", "backend"}}
    return DataConfig(**known, workers=workers, backend=flat["data_backend"], device_id=device_id)


def build_datasets(settings, quiet: bool = True):
    """(train, val, classes), the sample set built on first use; DataError on bad data."""
    from lars.data.loaders import build_datasets as datasets_of
    from lars.data.sample import build_sample_dataset

    if settings.data.dataset == "sample":  # safe when all ranks start at once
        build_sample_dataset(os.path.dirname(settings.data.train_dir), quiet=quiet)
    try:
        if settings.task.task == "barlowtwins":
            from lars.tasks.ssl_build import bt_datasets

            return bt_datasets(settings)
        return datasets_of(data_config(settings, workers=0))
    except (FileNotFoundError, ValueError) as error:
        message = str(error)
        if settings.data.data_dir and "--" not in message:  # an archive dataset's file
            message = f"--data-dir {settings.data.data_dir}: {message}"
        raise DataError(message) from None


def build_loaders(settings, dist, cuda: bool, datasets) -> Loaders:
    """This rank's loaders over `datasets`; DataError when the data backend cannot serve them."""
    from lars.data.loaders import DataBackendError
    from lars.data.loaders import build_loaders as loaders_of

    config = data_config(settings, settings.data.workers, dist.local_rank if cuda else None)
    try:
        return loaders_of(config, dist.rank, dist.size, pin_memory=cuda, datasets_=datasets)
    except DataBackendError as error:
        raise DataError(str(error)) from None


def build_model(settings, num_classes: int, device=None, dist=None) -> torch.nn.Module:
    """The classifier, or (--task barlowtwins) the Barlow Twins model, BatchNorm over `dist`."""
    from lars.models import build_model as model_of

    if settings.task.task == "barlowtwins":
        from lars.tasks.ssl_build import build_bt_model

        return build_bt_model(settings, device, dist)
    layout = torch.channels_last if settings.model.channels_last else torch.preserve_format
    return model_of(settings.model.model, num_classes).to(device or "cpu", memory_format=layout)


def build_optimizer(settings, model: torch.nn.Module, plan):
    """(optimizer, groups): --base-op over one group, or (--bn-bias-separately) the decayed and
    adapted weights plus a group of biases and normalisation parameters without either."""
    opt, trained = settings.optimizer, [p for p in model.parameters() if p.requires_grad]
    one_group = [{"params": trained, "weight_decay": opt.wd}]
    groups = param_groups(model, opt.wd) if opt.bn_bias_separately else one_group
    if opt.bn_bias_separately and settings.task.norm_bias_lr is not None:
        from lars.tasks.ssl_build import norm_bias_groups  # two rates: the Barlow Twins recipe

        groups = norm_bias_groups(settings, model, plan)
    spec = OPTIMIZER_SPECS[opt.base_op]
    hyper = {FLAG_TO_HYPERPARAMETER[flag]: getattr(opt, flag) for flag in spec.flags}
    if "delay_steps" in hyper:  # TVLARS: lambda and d_e (steps) as the plan resolved them
        hyper["lmbda"], hyper["delay_steps"] = plan.tv_lmbda, plan.tv_delay_steps
    return build_optimizer_by_name(opt.base_op, groups, lr=plan.lr, **hyper), groups


def describe_split(settings) -> str:
    """Which parameter groups the run's optimizer gets, and which setting decided it."""
    opt = settings.optimizer
    recommended = OPTIMIZER_SPECS[opt.base_op].bn_bias_separately
    why = f"the default for {opt.base_op}" if recommended == opt.bn_bias_separately else "asked for"
    if opt.bn_bias_separately:
        return (
            f"biases, normalisation and other vectors without weight decay and layer "
            f"adaptation (--bn-bias-separately, {why}; --no-bn-bias-separately: one group)"
        )
    return f"one group (--no-bn-bias-separately, {why}; --bn-bias-separately splits them)"


def schedule_arguments(settings, plan) -> dict:
    """The keyword arguments of `lars.schedules.build_scheduler` and `lr_at` for this run."""
    s = settings.schedule
    return dict(
        schedule=s.schedule,
        total_steps=plan.total_steps,
        warmup_steps=plan.warmup_steps,
        end_lr=s.end_lr,
        power=s.lr_power,
        milestones=plan.step_milestones(),
    )


def build_scheduler(settings, optimizer, plan):
    return build_closed_form_scheduler(optimizer, **schedule_arguments(settings, plan))


def build_scaler(settings, device: torch.device):
    return torch.amp.GradScaler(device.type) if settings.model.amp == "fp16" else None


def build_step_context(settings, plan, dist, device, model, optimizer, scheduler, scaler, uint8):
    """The step's pieces; `model` is wrapped for the backend (DDP) and compiled if asked."""
    from lars.data.fast import normalize_batch

    forward_model = dist.wrap_model(model)
    if settings.model.compile:
        forward_model = torch.compile(forward_model)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=settings.model.label_smoothing)
    if settings.task.task == "barlowtwins":  # (the model lays out each view after the split)
        from lars.tasks.ssl_build import bt_criterion

        loss_fn = bt_criterion(settings, plan, dist)
    return StepContext(
        model=forward_model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=scheduler,
        dist=dist,
        device=device,
        batches_per_allreduce=plan.batches_per_allreduce,
        amp_dtype=AMP_DTYPES.get(settings.model.amp),
        scaler=scaler,
        channels_last=settings.model.channels_last and settings.task.task != "barlowtwins",
        clip_grad_norm=settings.optimizer.clip_grad_norm,
        # uint8 batches from the fast pipeline are normalised once per batch, on the device.
        prepare=functools.partial(normalize_batch, device=device) if uint8 else None,
    )
