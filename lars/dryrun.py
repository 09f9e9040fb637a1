"""`--dry-run`: print what a run would do, without Horovod, a device or a training step.

It calls the training's own `lars.build` functions and `lars.plan.plan_run`, so what it prints is
what a run with the same settings trains with.
"""

from __future__ import annotations

import torch

from lars.build import build_datasets, build_model, build_optimizer, schedule_arguments
from lars.distributed import launched_rank, launched_size
from lars.param_groups import param_group_summary
from lars.plan import plan_run
from lars.schedules import lr_at


def dry_run(settings) -> dict:
    """Print the plan for `--ranks` (default: this launch's) ranks and return it."""
    ranks = settings.batch.ranks or launched_size()
    train, val, classes = build_datasets(settings)
    plan = plan_run(settings, ranks, len(train), len(val))
    model = build_model(settings, len(classes))
    _, groups = build_optimizer(settings, model, plan)
    total, warm = plan.total_steps, plan.warmup_steps
    points = sorted({0, warm // 2, warm, total // 4, total // 2, 3 * total // 4, total - 1})
    arguments = schedule_arguments(settings, plan)
    schedule = {step: lr_at(step, base_lr=plan.lr, **arguments) for step in points}
    if launched_rank() != 0:
        return {"plan": plan, "lr": schedule}
    s, opt = settings, settings.optimizer
    print(
        f"dry run: {s.data.dataset} ({len(train)} train, {len(val)} val images, "
        f"{len(classes)} classes), {s.model.model}, {opt.base_op}, {ranks} rank(s)"
    )
    print(
        f"global batch       {plan.global_batch_size} = {plan.micro_batch} per micro-batch x "
        f"{ranks} ranks x {plan.batches_per_allreduce} micro-batches per step"
    )
    print(
        f"learning rate      {plan.lr:.6g} = {opt.lr_scaling} scaling of base {opt.base_lr:g}"
        f" (reference batch {opt.lr_reference_batch})"
    )
    print(
        f"steps              {plan.steps_per_epoch} per epoch x {plan.epochs} epochs = {total}"
        f"; warm-up {warm} steps ({s.schedule.warmup_epochs:g} epochs); "
        f"schedule {s.schedule.schedule}"
    )
    phi = None
    if opt.base_op == "tvlars":
        from lars.optim.tvlars import tvlars_phi

        t = torch.tensor([float(step + 1) for step in points], dtype=torch.float64)
        phi = tvlars_phi(
            t,
            lmbda=opt.lmbda,
            alpha=opt.tv_alpha,
            delay_steps=plan.tv_delay_steps,
            min_scale=opt.tv_min_scale,
        ).tolist()
    for i, step in enumerate(points):
        extra = f"   tvlars phi {phi[i]:.4g}" if phi else ""
        print(
            f"  lr at step {step:>8} (epoch {step / plan.steps_per_epoch:7.2f}): "
            f"{schedule[step]:.6g}{extra}"
        )
    print(param_group_summary(model, groups))
    return {"plan": plan, "lr": schedule}
