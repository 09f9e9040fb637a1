"""The adaptive batch inside a training run: what the loop calls before, inside and after a step.

`AdaptiveBatch.build` returns None for `--test-type none` (the loop then runs exactly as
without this module). Otherwise the loop calls, per optimizer step:

    batch.before_step(step)                       is a test due (BatchController.test_due)?
    optimizer_step(...)                           lars.step calls begin / keep / finish: the
                                                  estimator sees the step's k micro-batches
    reiterate = batch.after_step(parts, state)    samples counted, test decided, geometry and
                                                  LR applied; True: a new micro-batch, so the
                                                  caller takes a fresh iterator of the loader

A change of geometry is applied between two steps, everywhere at once: the plan is re-planned
(`RunPlan.replan`), the distributed optimizer is told the new k (Horovod's
`set_backward_passes_per_step`, which also resets its pass counters; DDP's `no_sync` count is
the step context's k), and a new per-rank micro-batch goes to the loader's batch sampler, whose
`batch_size` is read when an iterator starts; the next iterator starts at this rank's offset in
the epoch (the sampler's `skip_samples`), so nothing prefetched at the old size is used and the
persistent workers are kept.

Budgets in samples: an epoch ends when this rank's remaining samples cannot fill k micro-batches
(so Horovod always sees exactly k backward passes); the run ends after --epochs epochs (or at
--max-steps). The LR schedule, warm-up and decay included, and TVLARS's t run at the position
samples seen / B0 (B0 the start batch, the unit the plan's step counts are in): at a fixed batch
that is the step count, so the schedule is the fixed run's.
"""

from __future__ import annotations

import torch

from . import flags
from .micro_batch import MicroBatchEstimator
from .per_sample import PerSampleEstimator
from .policy import BatchController, BatchGrowth, BatchState


def largest_plan(settings, plan):
    """(the caps, the plan at the largest batch they allow); SettingError (exit 2) when that
    batch cannot fill one step of an epoch."""
    growth = flags.growth(settings.flat(), plan.world_size, BatchGrowth)
    start = (plan.micro_batch, plan.batches_per_allreduce)
    return growth, plan.replan(settings, *growth.geometry_for(*start, growth.max_batch))


class AdaptiveBatch:
    """One run's adaptive batch: the controller (state, caps, test), the estimator, and the
    current plan (`plan`; `start` is the start's, the run's identity and schedule unit)."""

    def __init__(self, settings, start_plan, controller, estimator, per_sample) -> None:
        self.settings, self.start, self.plan = settings, start_plan, start_plan
        self.controller, self.estimator, self.per_sample = controller, estimator, per_sample
        self.testing = False
        self.moments = None  # the last test step's Moments (None on other steps)
        self.kept = None  # per-sample: the test step's first micro-batch (images, labels)

    @classmethod
    def build(cls, settings, plan, model, loss_fn) -> AdaptiveBatch | None:
        """None for --test-type none; SettingError (exit 2) when the max batch does not fit."""
        a = settings.adaptive
        if a.test_type == "none":
            return None
        growth = largest_plan(settings, plan)[0]
        state = BatchState(
            plan.micro_batch, plan.batches_per_allreduce, plan.world_size, plan.global_batch_size
        )
        tolerances = (a.eta, a.theta, a.nu)
        controller = BatchController(
            state, growth, a.test_type, a.test_interval, *tolerances, a.batch_lr_policy,
            a.batch_test_ema,
        )  # fmt: skip
        estimator = per_sample = None
        if a.batch_test_estimator == "micro-batch":
            mode = "none" if a.test_type == "norm" else a.batch_test_inner_products
            estimator = MicroBatchEstimator(list(model.parameters()), mode).attach()
        else:
            per_sample = PerSampleEstimator(
                model, loss_fn, a.per_sample_samples, a.per_sample_chunk, a.test_type != "norm"
            )
        return cls(settings, plan, controller, estimator, per_sample)

    @property
    def state(self) -> BatchState:
        return self.controller.state

    # ------------------------------------------------------------- inside the step (lars.step)
    def begin(self, ctx) -> None:
        self.moments, self.kept = None, None
        if self.estimator is not None:
            scale = ctx.scaler._scale if ctx.scaler is not None else None
            self.estimator.begin_step(ctx.batches_per_allreduce, scale, active=self.testing)

    def keep(self, images, labels) -> None:
        """The step's first micro-batch, for the per-sample estimator on a test step."""
        if self.per_sample is not None and self.testing and self.kept is None:
            self.kept = (images, labels)

    def finish(self, ctx) -> None:
        """After synchronisation and unscaling, before clipping: the test's moments, from the
        averaged gradient and the weights of this step (the gradients are not changed)."""
        if not self.testing:
            return
        if self.estimator is not None:
            self.moments = self.estimator.finish(self.plan.micro_batch, ctx.dist.allreduce_sum)
        elif self.kept is not None:
            self.moments = self.per_sample.moments(*self.kept, ctx.dist.allreduce_sum)
        self.kept = None

    # ------------------------------------------------------------------------ between steps
    def before_step(self, step: int) -> None:
        self.testing = self.controller.test_due(step)

    def after_step(self, parts, state) -> bool:
        """Count the step's samples, decide the test, apply a new geometry and the LR; True
        when the micro-batch changed (the caller then restarts the loader's iterator)."""
        s, micro = self.state, self.plan.micro_batch
        self.controller.after_step()
        s.epoch_samples += s.global_batch_size
        if self.moments is not None:
            self.controller.observe(self.moments)
            # The reduced moments are equal on every rank; rank 0's decision is the rule.
            geometry = parts.dist.broadcast_object(
                (s.micro_batch, s.batches_per_allreduce), name="lars.batch"
            )
            s.micro_batch, s.batches_per_allreduce = geometry
            before = self.plan.global_batch_size
            if self.apply(parts):
                parts.reporter.print(
                    f"step {state.step}: batch {before} -> {s.global_batch_size} = "
                    f"{s.micro_batch} x {s.world_size} x {s.batches_per_allreduce} "
                    f"(test: b_new {s.last['b_new']:.4g}, {s.samples_seen} samples seen)"
                )
        self.apply_lr(parts.step.optimizer, parts.step.scheduler)
        if self.moments is not None:
            self._report(parts, state)
        return self.plan.micro_batch != micro

    def apply(self, parts) -> bool:
        """Make the run follow the state's geometry (no-op when it already does)."""
        s, plan = self.state, self.plan
        wanted = (s.micro_batch, s.batches_per_allreduce)
        if wanted == (plan.micro_batch, plan.batches_per_allreduce):
            return False
        self.plan = self.start.replan(self.settings, s.micro_batch, s.batches_per_allreduce)
        parts.dist.set_batches_per_allreduce(parts.step.optimizer, s.batches_per_allreduce)
        parts.step.batches_per_allreduce = s.batches_per_allreduce
        loader, sampler = parts.data.train, parts.data.train_sampler
        if getattr(loader, "batch_sampler", None) is not None:
            loader.batch_sampler.batch_size = s.micro_batch
        sampler.skip_samples = self.epoch_offset()
        return True

    def apply_lr(self, optimizer, scheduler) -> None:
        """Every group's rate: the schedule at samples seen / B0, times the policy's factor;
        TVLARS's t likewise (the schedule's own counter stays the step count)."""
        s = self.state
        position = s.samples_seen / s.start_batch
        counted = scheduler.last_epoch
        scheduler.last_epoch = position  # ClosedFormLR: a pure function of the position
        try:
            rates = scheduler.get_lr()
        finally:
            scheduler.last_epoch = counted
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate * s.lr_factor
        from lars.optim import TVLARS

        if isinstance(optimizer, TVLARS):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    step = optimizer.state[p].get("step")
                    if torch.is_tensor(step):
                        step.fill_(position)

    def _report(self, parts, state) -> None:
        values = {**self.controller.scalars()}
        values["batch/lr"] = parts.step.optimizer.param_groups[0]["lr"]
        values = {k: float(v) for k, v in values.items() if v == v}  # nan: not computed
        parts.reporter.scalars(values, state.step)
        by_samples = {f"by_samples/{k}": v for k, v in values.items()}
        parts.reporter.scalars(by_samples, self.state.samples_seen)

    # ------------------------------------------------------------------ epochs and budgets
    def epoch_offset(self) -> int:
        """This rank's samples of the current epoch already used."""
        return self.state.epoch_samples // self.state.world_size

    def step_fits(self, sampler) -> bool:
        """Can this rank's rest of the epoch fill k micro-batches (the loader drops the last
        partial micro-batch)?"""
        s = self.state
        left = sampler.num_samples - self.epoch_offset()
        return left // s.micro_batch >= s.batches_per_allreduce

    def end_epoch(self, sampler) -> bool:
        """After an epoch's training: True (and a new epoch's count) when it is used up."""
        if self.step_fits(sampler):
            return False  # stopped inside the epoch (--max-steps)
        self.state.epoch_samples = 0
        return True

    def samples_left(self) -> int:
        """Samples to the end of the budget (of --epochs or --max-samples; --max-steps aside),
        roughly: an epoch at a larger batch drops a larger remainder."""
        budget = self.start.total_steps * self.start.global_batch_size
        budget = min(budget, self.settings.schedule.max_samples or budget)
        return max(0, budget - self.state.samples_seen)

    def finished(self, state) -> bool:
        sched = self.settings.schedule
        return (
            state.epoch >= self.start.epochs
            or bool(sched.max_steps and state.step >= sched.max_steps)
            or bool(sched.max_samples and self.state.samples_seen >= sched.max_samples)
        )

    # ------------------------------------------------------------------------- checkpoints
    def payload(self) -> dict:
        estimator = self.estimator.state_dict() if self.estimator is not None else None
        return {"adaptive_batch": {"state": self.state.to_payload(), "estimator": estimator}}

    def restore(self, parts, state) -> None:
        """Continue a checkpoint's batch schedule (or, from a fixed-batch checkpoint, start
        growing at its position)."""
        saved = state.adaptive_batch
        if saved is None:
            s = self.state
            s.samples_seen = state.step * s.global_batch_size
            s.epoch_samples = state.step_in_epoch(self.start) * s.global_batch_size
        else:
            self.controller.state = BatchState.from_payload(saved["state"])
            if self.state.smoother:
                self.controller.smoother.load_state_dict(self.state.smoother)
            if self.estimator is not None and saved.get("estimator"):
                self.estimator.load_state_dict(saved["estimator"])
        self.apply(parts)
        self.apply_lr(parts.step.optimizer, parts.step.scheduler)

    def describe(self) -> list[str]:
        return flags.describe(self.settings.adaptive, self.start)
