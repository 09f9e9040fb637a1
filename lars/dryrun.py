"""`--dry-run`: print what a run would do, without Horovod, a device or a training step."""

from __future__ import annotations

import torch

from lars.config import UsageError
from lars.data.loaders import build_datasets
from lars.data.sample import build_sample_dataset
from lars.distributed import launched_rank, launched_size
from lars.models import build_model
from lars.param_groups import param_group_summary
from lars.plan import data_config, make_optimizer, plan_run, step_milestones
from lars.schedules import lr_at


def dry_run(args) -> dict:
    """Print the plan for `--ranks` (default: this launch's) ranks and return it."""
    ranks = args.ranks or launched_size()
    if args.dataset == "sample":
        root = build_sample_dataset(quiet=True)
        args.train_dir, args.val_dir = str(root / "train"), str(root / "val")
    try:
        train, val, classes = build_datasets(data_config(args, workers=0))
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    plan = plan_run(args, ranks, len(train), len(val))
    model = build_model(args.model, len(classes))
    _, groups = make_optimizer(args, model, plan)
    total, warm = plan.total_steps, plan.warmup_steps
    points = sorted({0, warm // 2, warm, total // 4, total // 2, 3 * total // 4, total - 1})
    schedule = {
        step: lr_at(
            step,
            schedule=args.schedule,
            base_lr=plan.lr,
            total_steps=total,
            warmup_steps=warm,
            end_lr=args.end_lr,
            power=args.lr_power,
            milestones=step_milestones(plan),
        )
        for step in points
    }
    if launched_rank() != 0:
        return {"plan": plan, "lr": schedule}
    print(
        f"dry run: {args.dataset} ({len(train)} train, {len(val)} val images, "
        f"{len(classes)} classes), {args.model}, {args.base_op}, {ranks} rank(s)"
    )
    print(
        f"global batch       {plan.global_batch_size} = {args.batch_size} per micro-batch x "
        f"{ranks} ranks x {args.batches_per_allreduce} micro-batches per step"
    )
    print(
        f"learning rate      {plan.lr:.6g} = {args.lr_scaling} scaling of base {args.base_lr:g}"
        f" (reference batch {args.lr_reference_batch})"
    )
    print(
        f"steps              {plan.steps_per_epoch} per epoch x {args.epochs} epochs = {total}"
        f"; warm-up {warm} steps ({args.warmup_epochs:g} epochs); schedule {args.schedule}"
    )
    phi = None
    if args.base_op == "tvlars":
        from lars.optim.tvlars import tvlars_phi

        t = torch.tensor([float(s + 1) for s in points], dtype=torch.float64)
        phi = tvlars_phi(
            t,
            lmbda=args.lmbda,
            alpha=args.tv_alpha,
            delay_steps=plan.tv_delay_steps,
            min_scale=args.tv_min_scale,
        ).tolist()
    for i, step in enumerate(points):
        extra = f"   tvlars phi {phi[i]:.4g}" if phi else ""
        print(
            f"  lr at step {step:>8} (epoch {step / plan.steps_per_epoch:7.2f}): "
            f"{schedule[step]:.6g}{extra}"
        )
    print(param_group_summary(model, groups))
    return {"plan": plan, "lr": schedule}
