"""The run plan: the batch geometry and every count derived from it, decided before training.

global batch B = micro-batch b x ranks W x batches per allreduce k. An epoch is `steps_per_epoch`
whole global batches: DistributedSampler gives each rank ceil(N / W) samples, the loader drops
the last partial micro-batch, and the micro-batches that would not fill a group of k are dropped
(Horovod needs exactly k backward passes per step, horovod#2466). `RunPlan.replan` gives the plan
for another geometry between two steps (a batch that grows during the run).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace

from lars.errors import SettingError
from lars.schedules import STEP_DECAY_EPOCHS, epochs_to_steps, scale_lr


@dataclass(frozen=True)
class BatchGeometry:
    world_size: int
    micro_batch: int  # images per rank per micro-batch
    batches_per_allreduce: int  # k: micro-batches per optimizer step

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch * self.world_size * self.batches_per_allreduce

    @property
    def samples_per_rank_per_step(self) -> int:
        return self.micro_batch * self.batches_per_allreduce


def batch_geometry(settings, world_size: int, micro_batch=None, batches_per_allreduce=None):
    """The settings' geometry, or the one given: the only reader of --batch-size and
    --batches-per-allreduce for training."""
    micro_batch = micro_batch or settings.batch.batch_size
    k = batches_per_allreduce or settings.batch.batches_per_allreduce
    return BatchGeometry(world_size, micro_batch, k)


@dataclass(frozen=True)
class RunPlan(BatchGeometry):
    """Saved in config.json ("plan", with the derived counts) and printed at start-up."""

    train_images: int
    val_images: int
    epochs: int
    max_steps: int | None
    max_samples: int | None
    lr: float  # the peak rate, scaled for the global batch
    warmup_steps: int
    tv_lmbda: float  # TVLARS's lambda, per step (see tvlars_phi_parameters)
    tv_delay_steps: float  # TVLARS's d_e, in optimizer steps

    @property
    def micro_batches_per_epoch(self) -> int:
        return -(-self.train_images // self.world_size) // self.micro_batch

    @property
    def steps_per_epoch(self) -> int:
        return self.micro_batches_per_epoch // self.batches_per_allreduce

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def last_step(self) -> int:
        """The step the run stops at: the schedule's end, or --max-steps / --max-samples if
        sooner (at a fixed batch, the step whose samples reach --max-samples)."""
        by_samples = -(-self.max_samples // self.global_batch_size) if self.max_samples else None
        return min(
            self.max_steps or self.total_steps, by_samples or self.total_steps, self.total_steps
        )

    def step_milestones(self) -> list[int]:
        """The step schedule's decay points (epochs 30/60/80 of Goyal et al.), in steps."""
        return [self.steps_per_epoch * epoch for epoch in STEP_DECAY_EPOCHS]

    def to_dict(self) -> dict:
        derived = ("global_batch_size", "micro_batches_per_epoch", "steps_per_epoch", "total_steps")
        return {**asdict(self), **{key: getattr(self, key) for key in derived}}

    def replan(self, settings, micro_batch: int, batches_per_allreduce: int) -> RunPlan:
        """The plan of the same run with another batch geometry (call between steps)."""
        sizes = self.world_size, self.train_images, self.val_images
        return plan_run(settings, *sizes, micro_batch, batches_per_allreduce)


def plan_run(
    settings,
    world_size: int,
    train_images: int,
    val_images: int,
    micro_batch: int | None = None,
    batches_per_allreduce: int | None = None,
) -> RunPlan:
    """The plan for `settings` on `world_size` ranks (geometry: `batch_geometry`)."""
    opt, sched = settings.optimizer, settings.schedule
    plan = RunPlan(
        **asdict(batch_geometry(settings, world_size, micro_batch, batches_per_allreduce)),
        train_images=train_images,
        val_images=val_images,
        epochs=sched.epochs,
        max_steps=sched.max_steps,
        max_samples=sched.max_samples,
        lr=0.0,
        warmup_steps=0,
        tv_lmbda=0.0,
        tv_delay_steps=0.0,
    )
    steps, batch = plan.steps_per_epoch, plan.global_batch_size
    if steps == 0:
        raise SettingError(
            f"the global batch ({plan.micro_batch} x {world_size} ranks x "
            f"{plan.batches_per_allreduce} = {batch}) is larger than the training set "
            f"({train_images} images): lower --batch-size or --batches-per-allreduce, or "
            "use fewer ranks (--ranks, in a dry run)"
        )
    lmbda, delay = (
        tvlars_phi_parameters(opt.lmbda, opt.tv_delay_epochs, opt.tv_alpha, steps, plan.total_steps)
        if opt.tv_alpha is not None  # None: an optimizer without phi
        else (0.0, 0.0)
    )
    return replace(
        plan,
        lr=scale_lr(opt.base_lr, batch, opt.lr_reference_batch, opt.lr_scaling),
        warmup_steps=epochs_to_steps(sched.warmup_epochs, steps),
        tv_lmbda=lmbda,
        tv_delay_steps=delay,
    )


TV_HOLD_FRACTION = 0.1  # the default TVLARS run holds phi >= 0.99 / alpha for this part
TV_HOLD_LEVEL = 0.99  # ... and ends at (1 - TV_HOLD_LEVEL) / alpha
_TV_RATIO = TV_HOLD_LEVEL / (1.0 - TV_HOLD_LEVEL)  # 99
PAPER_LMBDA = 0.001  # the authors' default lambda, per step (github.com/KhoiDOO/tvlars)


def tvlars_phi_parameters(
    lmbda: float | None, delay_epochs: float | None, alpha: float, steps_per_epoch: int, total: int
) -> tuple[float, float]:
    """(lambda per step, d_e in steps) of TVLARS's phi(t) = 1 / (alpha + exp(lambda (t - d_e)))
    + gamma_min (Do et al. 2023, arXiv:2309.14053, eq. 4-5).

    Given either, the other takes the authors' default (lambda 0.001 per step, d_e 0), so the
    paper's exact per-step values stay available. Given neither, both follow the run's length T:
    with H = max(1, round(0.1 T)) hold steps, phi(H) = 0.99 / alpha and phi(T) = 0.01 / alpha
    (each + gamma_min), i.e.

        lambda = 2 ln 99 / max(T - H, 1),      d_e = H + ln(99 / alpha) / lambda,

    so phi(1) >= 0.99 / alpha (plain LARS at the full rate when alpha = 1), holds there for the
    first 10% of the steps, is 0.5 / alpha at (H + T) / 2 and 0.01 / alpha at the end, at any
    batch size and run length. (With alpha = 1, lambda 0.001 and d_e = 0, phi(1) = 0.4998, and
    at global batch 1024 on ImageNet phi is 0.0019 after 5 epochs: the run stalls.)
    """
    if lmbda is not None or delay_epochs is not None:
        delay = float(epochs_to_steps(delay_epochs or 0.0, steps_per_epoch))
        return (PAPER_LMBDA if lmbda is None else lmbda), delay
    hold = max(1, round(TV_HOLD_FRACTION * total))
    auto_lmbda = 2.0 * math.log(_TV_RATIO) / max(total - hold, 1)
    # d_e >= 0 (the optimizer's range): for alpha > 99 the hold would need a negative delay.
    return auto_lmbda, max(0.0, hold + math.log(_TV_RATIO / alpha) / auto_lmbda)


def tvlars_hold_end(lmbda: float, delay_steps: float, alpha: float) -> float:
    """The step t at which phi falls to 0.99 of its plateau 1 / alpha (gamma_min aside):
    1 / (alpha + exp(lambda (t - d_e))) = 0.99 / alpha; inf when lambda is 0 (no decay)."""
    return delay_steps - math.log(_TV_RATIO / alpha) / lmbda if lmbda > 0 else math.inf


def default_log_dir(settings, world_size: int) -> str:
    """runs/<dataset>-<model>-<optimizer>-gb<global batch>-<short fingerprint>: the same
    command resumes itself, and two sets of settings never share a folder."""
    from lars.fingerprint import run_identity, short_fingerprint

    s, batch = settings, batch_geometry(settings, world_size).global_batch_size
    name = f"{s.data.dataset}-{s.model.model}-{s.optimizer.base_op}-gb{batch}"
    return os.path.join("runs", f"{name}-{short_fingerprint(run_identity(s.flat(), batch))}")
