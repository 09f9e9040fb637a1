"""`--dry-run`: print what a run would do, without Horovod, a device or a training step.

It calls the training's own `lars.build` functions and `lars.plan.plan_run`, so what it prints is
what a run with the same settings trains with. The training set is counted from the data, or,
for a plan checked before the data is on the machine, taken from `--train-images N` or from
ImageNet-1k's known size (`--dataset imagenet`).
"""

from __future__ import annotations

import math
import os

import torch

from lars.build import (
    build_datasets,
    build_model,
    build_optimizer,
    describe_split,
    schedule_arguments,
)
from lars.distributed import launched_rank, launched_size
from lars.fingerprint import run_identity, short_fingerprint
from lars.param_groups import param_group_summary
from lars.plan import plan_run, tvlars_hold_end
from lars.schedules import lr_at

# (training images, validation images, classes) of the datasets whose size is known.
KNOWN_SIZES = {
    "imagenet": (1_281_167, 50_000, 1000),  # ILSVRC-2012 (Russakovsky et al. 2015)
    "cifar10": (50_000, 10_000, 10),
    "cifar100": (50_000, 10_000, 100),
    "tinyimagenet": (100_000, 10_000, 200),
}


def _sizes(settings) -> tuple[int, int, int, str]:
    """(train, val, classes, note): counted from the data unless the user sized the plan."""
    data = settings.data
    absent = data.dataset == "imagenet" and not (data.train_dir and os.path.isdir(data.train_dir))
    if data.train_images is None and not absent:
        train, val, classes = build_datasets(settings)
        return len(train), len(val), len(classes), ""
    known_train, val, classes = KNOWN_SIZES.get(data.dataset, (None, 0, 1000))
    source = "--train-images" if data.train_images is not None else "ImageNet-1k's size"
    return data.train_images or known_train, val, classes, f"; not read: {source}"


def dry_run(settings) -> dict:
    """Print the plan for `--ranks` (default: this launch's) ranks and return it."""
    ranks = settings.batch.ranks or launched_size()
    train, val, classes, note = _sizes(settings)
    plan = plan_run(settings, ranks, train, val)
    model = build_model(settings, classes)
    _, groups = build_optimizer(settings, model, plan)
    total, warm = plan.total_steps, plan.warmup_steps
    points = sorted({0, warm // 2, warm, total // 4, total // 2, 3 * total // 4, total - 1})
    arguments = schedule_arguments(settings, plan)
    schedule = {step: lr_at(step, base_lr=plan.lr, **arguments) for step in points}
    if launched_rank() != 0:
        return {"plan": plan, "lr": schedule}
    s, opt = settings, settings.optimizer
    variant = f" ({opt.optimizer_variant})" if opt.optimizer_variant else ""
    fingerprint = short_fingerprint(run_identity(s.flat(), plan.global_batch_size))
    print(
        f"dry run: {s.data.dataset} ({train:,} train, {val:,} val images, {classes} classes"
        f"{note}), {s.model.model}, {opt.base_op}{variant}, {ranks} rank(s)\n"
        f"fingerprint        {fingerprint} (log dir {s.run.log_dir})\n"
        f"global batch       {plan.global_batch_size} = {plan.micro_batch} per micro-batch x "
        f"{ranks} ranks x {plan.batches_per_allreduce} micro-batches per step\n"
        f"learning rate      {plan.lr:.6g} = {opt.lr_scaling} scaling of base {opt.base_lr:g}"
        f" (reference batch {opt.lr_reference_batch})\n"
        f"steps              {plan.steps_per_epoch} per epoch x {plan.epochs} epochs = {total}"
        f"; warm-up {warm} steps ({s.schedule.warmup_epochs:g} epochs); "
        f"schedule {s.schedule.schedule}"
    )
    phi = _print_tvlars(settings, plan) if opt.base_op == "tvlars" else None
    for step in points:
        extra = f"   tvlars phi {phi(step + 1):.4g}" if phi else ""
        print(
            f"  lr at step {step:>8} (epoch {step / plan.steps_per_epoch:7.2f}): "
            f"{schedule[step]:.6g}{extra}"
        )
    print(f"parameter groups   {describe_split(settings)}")
    print(param_group_summary(model, groups))
    if settings.task.task == "barlowtwins":
        from lars.tasks.ssl_run import task_lines

        print("\n".join(task_lines(settings, model.feature_width, groups)))
    return {"plan": plan, "lr": schedule}


def _print_tvlars(settings, plan):
    """Print phi's parameters and its value at the first step, the end of the delay (where phi
    falls below 0.99 of its start), half-way and the last step; return phi(t)."""
    from lars.optim.tvlars import tvlars_phi

    opt, total = settings.optimizer, plan.total_steps
    lmbda, delay, alpha = plan.tv_lmbda, plan.tv_delay_steps, opt.tv_alpha

    options = dict(lmbda=lmbda, alpha=alpha, delay_steps=delay, min_scale=opt.tv_min_scale)

    def phi(t: float) -> float:
        return tvlars_phi(torch.tensor(float(t), dtype=torch.float64), **options).item()

    given = opt.lmbda is not None or opt.tv_delay_epochs is not None
    origin = "as given" if given else "defaults from the run's length"
    print(
        f"tvlars phi         1 / (alpha + exp(lmbda (t - d_e))) + gamma_min: lmbda {lmbda:.4g} "
        f"per step, d_e {delay:.1f} steps ({delay / plan.steps_per_epoch:.2f} epochs), alpha "
        f"{alpha:g}, gamma_min {opt.tv_min_scale:g} ({origin})"
    )
    hold = tvlars_hold_end(lmbda, delay, alpha)
    end = min(total, math.floor(hold)) if 1 <= hold < math.inf else (total if hold > 1 else 1)
    why = "" if hold >= 1 else ", none: phi starts below 0.99 of 1 / alpha"
    for name, t in (
        ("the first step", 1),
        (f"the end of the delay (t={end}{why})", end),
        ("half-way", max(1, total // 2)),
        ("the last step", total),
    ):
        label = name if "(" in name else f"{name} (t={t})"
        print(f"  phi at {label}: {phi(t):.6g}")
    return phi
