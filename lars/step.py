"""One optimizer step, in the only order that is correct with Horovod, AMP and accumulation.

for each of k micro-batches:   forward (autocast), loss / k, backward (scaled for fp16);
                               Horovod allreduces during the k-th backward, DDP after it
synchronise                    wait for the averaged gradients (horovod#1089, #3160)
unscale                        fp16: divide by the loss scale
clip                           --clip-grad-norm, on the averaged, unscaled gradients
check finite                   the same verdict on every rank (the gradients are averaged)
step                           without a second synchronisation; fp16: GradScaler.step
schedule, zero_grad

A skipped step (non-finite gradients, or GradScaler's overflow skip under fp16) is a step taken
without an update: the LR schedule, the optimizer's step count t (TVLARS's phi, LAMB's and
Adam's bias correction) and the trainer's step counter all advance by one, and the weights and
the optimizer's moments stay as they were. So t, the schedule's step and the logged step are
always the same number, and the data position (one global batch per step) stays aligned.

Adasum (Horovod's `op=Adasum`) runs each parameter's local optimizer step inside the backward
hook and `step()` applies the reduced updates, so there is no point between the gradients and
the update: unscaling, clipping and skipping are refused up front (`lars.checks`), and a
non-finite step still completes `step()` (the weights then hold non-finite values, which no
checkpoint accepts) before the run aborts.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Callable

import torch

from lars.faults import grads_are_finite


@dataclass
class StepContext:
    model: torch.nn.Module  # what runs the forward pass (DDP- or compile-wrapped)
    loss_fn: Callable
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    dist: object  # a lars.distributed backend
    device: torch.device
    batches_per_allreduce: int
    amp_dtype: torch.dtype | None = None  # torch.bfloat16, torch.float16 or None
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    channels_last: bool = False
    clip_grad_norm: float | None = None
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None  # e.g. uint8 -> normalised


def _inputs(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor):
    images = images.to(ctx.device, non_blocking=True)
    labels = labels.to(ctx.device, non_blocking=True)
    if ctx.prepare is not None:
        images = ctx.prepare(images)
    if ctx.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


def advance_step_counts(optimizer, skipped: bool | torch.Tensor) -> None:
    """Add `skipped` (a bool, or a 0-dim bool tensor on the device: no host sync) to every
    parameter's step count t. The project's optimizers read t from `state[p]["step"]` and create
    it only when missing, so one is created for a parameter skipped before its first update;
    torch.optim's initialise their whole state on the first update, so theirs are left alone
    until they exist."""
    from lars.optim import LAMB, LARS

    creates = isinstance(optimizer, (LARS, LAMB))  # TVLARS is a LARS; Horovod subclasses them
    steps = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if "step" not in state and creates:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            if torch.is_tensor(state.get("step")):
                steps.append(state["step"])
    if steps and isinstance(skipped, torch.Tensor):
        torch._foreach_add_(steps, skipped.to(torch.float32))
    elif steps and skipped:
        torch._foreach_add_(steps, 1.0)


def optimizer_step(ctx: StepContext, batches, meter, bad_paths: list) -> bool:
    """Consume k micro-batches from `batches` and make one optimizer step (see the module
    docstring). Returns False when the step was skipped for non-finite gradients."""
    k, model = ctx.batches_per_allreduce, ctx.model
    for i, (images, labels, bad) in enumerate(islice(batches, k)):
        bad_paths += bad
        with ctx.dist.micro_batch(model, last=i == k - 1):  # DDP: no_sync() but for the last
            if images is None:  # every file of this micro-batch was unreadable: Horovod still
                loss = sum(p.sum() for p in model.parameters()) * 0.0  # needs k backward passes
                loss.backward()
                continue
            images, labels = _inputs(ctx, images, labels)
            amp = ctx.amp_dtype is not None
            with torch.autocast(ctx.device.type, dtype=ctx.amp_dtype or torch.float32, enabled=amp):
                output = model(images)
                loss = ctx.loss_fn(output, labels)
            scaled = loss / k
            (ctx.scaler.scale(scaled) if ctx.scaler is not None else scaled).backward()
        meter.update(loss, output, labels)

    optimizer, dist = ctx.optimizer, ctx.dist
    dist.synchronize(optimizer)
    if ctx.scaler is not None:
        ctx.scaler.unscale_(optimizer)
    if ctx.clip_grad_norm:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, ctx.clip_grad_norm)
    if ctx.scaler is not None:
        # GradScaler skips steps with inf/NaN itself and lowers the scale: that is fp16's
        # normal operation, not a fault to count, but still a step taken without an update.
        scale = ctx.scaler._scale.clone()  # the device tensor get_scale() would read (a sync)
        with dist.skip_synchronize(optimizer):
            ctx.scaler.step(optimizer)
        ctx.scaler.update()
        # The scale drops (backoff_factor < 1) exactly when the step was skipped.
        advance_step_counts(optimizer, ctx.scaler._scale < scale)
        finite = True
    else:
        finite = dist.all_finite(grads_are_finite(optimizer))
        if finite or dist.adasum:  # Adasum: the update was made in the backward pass
            dist.step(optimizer)
        else:
            advance_step_counts(optimizer, True)
    ctx.scheduler.step()
    optimizer.zero_grad()  # torch >= 2 sets grads to None (Horovod's wrapper takes no flag)
    return finite
