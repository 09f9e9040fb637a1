"""The training loop: `run(settings)` builds a run's parts, then `fit` trains them.

`fit` -> `train_one_epoch` (k = plan.batches_per_allreduce micro-batches per optimizer step;
`lars.step.optimizer_step` is the one place that orders a step) -> `finish_epoch` (`validate`,
checkpoint). Each epoch runs `plan.steps_per_epoch` whole optimizer steps, so Horovod always sees
exactly k backward passes per step (horovod#2466). Every rank runs this; the distributed runtime
sits behind `lars.distributed`. Problems are raised as `lars.errors` domain errors.

What survives what (README, "Fault tolerance"): checkpoints hold everything needed to continue
bitwise (`lars.state.TrainState`, model, optimizer, schedule, scaler, RNG states); SIGTERM or
SIGUSR1 stops every rank after the same step, checkpoints and ends the run with `Preempted`
(exit REQUEUE_EXIT_STATUS); a non-finite gradient skips the step (or aborts) and never reaches a
checkpoint; unreadable images are skipped and counted (or stop the run with --strict-data).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from lars.adaptive.run import AdaptiveBatch
from lars.build import (
    build_datasets,
    build_loaders,
    build_model,
    build_optimizer,
    build_scaler,
    build_scheduler,
    build_step_context,
)
from lars.checkpoint import rng_states, save_checkpoint
from lars.data.loaders import Loaders
from lars.distributed import init_distributed, launched_rank
from lars.errors import DataError, NonFiniteAbort, Preempted
from lars.faults import REQUEUE_EXIT_STATUS, StopAgreement, Watchdog, params_are_finite
from lars.fingerprint import fingerprint
from lars.metrics import TrainMeter, average_batchnorm_statistics, evaluate
from lars.plan import RunPlan, plan_run
from lars.reporting import (
    Reporter,
    describe,
    describe_validation,
    eta_seconds,
    log_train,
    report_bad_files,
    run_config,
)
from lars.resume import identity, resume
from lars.settings import Settings
from lars.signals import install_preemption_handler
from lars.state import TrainState
from lars.step import StepContext, optimizer_step

__all__ = ["REQUEUE_EXIT_STATUS", "Parts", "build_run", "fit", "run", "train_one_epoch", "validate"]


@dataclass(frozen=True)
class Parts:
    """What `build_run` made for one run; `step` holds the optimizer, schedule and scaler."""

    settings: Settings
    plan: RunPlan
    dist: object  # a lars.distributed backend
    device: torch.device
    data: Loaders
    model: torch.nn.Module  # unwrapped: what checkpoints and validation use
    groups: list
    step: StepContext
    reporter: Reporter
    watchdog: Watchdog
    preemption: object  # lars.signals.PreemptionHandler
    batch: AdaptiveBatch | None = None  # --test-type: the growing batch (None: a fixed batch)


def run(settings: Settings) -> dict | None:
    """Train with `settings`; the last validation's metrics (None if there was none)."""
    if settings.task.task == "barlowtwins":  # pre-training, then the linear probe
        from lars.tasks.ssl_run import run_barlow_twins

        return run_barlow_twins(settings)
    preemption = install_preemption_handler()  # first: a signal during start-up is not lost
    parts, state = build_run(settings, preemption)
    try:
        return fit(parts, state)
    finally:
        preemption.uninstall()
        parts.reporter.close()
        parts.dist.shutdown()


def configure_torch(settings: Settings, dist, cuda: bool) -> torch.device:
    hw, deterministic = settings.hardware, settings.run.deterministic
    torch.set_num_threads(hw.threads or max(1, (os.cpu_count() or 1) // dist.local_size))
    if cuda:
        torch.cuda.set_device(dist.local_rank)
        torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(settings.run.seed)
    return torch.device("cuda" if cuda else "cpu")


def build_run(settings: Settings, preemption) -> tuple[Parts, TrainState]:
    """Every part of the run, and the state to continue from (restored from a checkpoint)."""
    hw, run = settings.hardware, settings.run
    cuda = torch.cuda.is_available() and not hw.no_cuda
    # The data is checked before the distributed runtime starts: bad input costs nothing.
    found = build_datasets(settings, quiet=launched_rank() != 0)
    dist = init_distributed(hw.backend, cuda, hw.stall_timeout, hw.fp16_allreduce, hw.use_adasum)
    device = configure_torch(settings, dist, cuda)
    data = build_loaders(settings, dist, cuda, found)
    plan = plan_run(settings, dist.size, data.train_size, data.val_size)
    model = build_model(settings, data.num_classes, device, dist)
    optimizer, groups = build_optimizer(settings, model, plan)
    # Horovod rebuilds the optimizer as Cls(param_groups): wrap before loading any state.
    optimizer = dist.wrap_optimizer(optimizer, model, plan.batches_per_allreduce)
    scheduler, scaler = build_scheduler(settings, optimizer, plan), build_scaler(settings, device)
    state = resume(settings, dist, plan, model, optimizer, scheduler, scaler)
    dist.broadcast_model(model)
    step = build_step_context(
        settings, plan, dist, device, model, optimizer, scheduler, scaler, data.uint8
    )
    purge = state.log_step + 1 if state.log_step else None  # TensorBoard events after it: dropped
    reporter = Reporter(
        run.log_dir, enabled=dist.rank == 0, purge_step=purge, progress=run.progress
    )
    watchdog = Watchdog(hw.stall_timeout, lambda: f"on rank {dist.rank} at step {state.step}")
    step.batch_test = batch = AdaptiveBatch.build(settings, plan, model, step.loss_fn)
    parts = Parts(
        settings, plan, dist, device, data, model, groups, step, reporter, watchdog, preemption,
        batch,
    )  # fmt: skip
    if batch is not None:  # the checkpoint's geometry, LR and position in the epoch
        batch.restore(parts, state)
    return parts, state


# --------------------------------------------------------------------------------- checkpoints
def save(parts: Parts, state: TrainState) -> None:
    """Rank 0 writes a checkpoint of the current state; never one holding NaN or inf.
    Collective: every rank calls it (the BatchNorm statistics saved are the ranks' mean)."""
    average_batchnorm_statistics(parts.model, parts.dist)
    if parts.dist.rank != 0:
        return
    if not params_are_finite(parts.model):
        parts.reporter.print("warning: not writing a checkpoint: the model holds non-finite values")
        return
    step, scalars = parts.step, (int, float, str, bool, type(None))
    payload = {
        **state.to_payload(parts.plan),
        "model": parts.model.state_dict(),
        "optimizer": step.optimizer.state_dict(),
        "scheduler": step.scheduler.state_dict(),
        "scaler": step.scaler.state_dict() if step.scaler is not None else None,
        "rng": rng_states(),
        "config": {k: v for k, v in parts.settings.flat().items() if isinstance(v, scalars)},
        "fingerprint": fingerprint(identity(parts.settings, parts.plan)),
        **(parts.batch.payload() if parts.batch else {}),
    }
    run = parts.settings.run
    save_checkpoint(payload, run.log_dir, state.log_step, run.keep_checkpoints)
    parts.watchdog.kick()


def check_strict_data(parts: Parts, paths: list[str]) -> None:
    """--strict-data: the first unreadable file stops the run (exit status 2)."""
    if paths and parts.settings.data.strict_data:
        raise DataError(
            f"unreadable file {paths[0]} (remove it, or drop --strict-data to skip such files)",
            path=paths[0],
        )


# --------------------------------------------------------------------------------- the loop
def validate(parts: Parts, state: TrainState) -> dict[str, float]:
    """Whole-set validation metrics of the current model, logged at the current step. Every
    rank scores with the same BatchNorm statistics, the ranks' mean (which a checkpoint saves)."""
    average_batchnorm_statistics(parts.model, parts.dist)
    metrics = evaluate(
        parts.model,
        parts.data.val,
        parts.dist,
        parts.device,
        progress=parts.watchdog.kick,
        amp_dtype=parts.step.amp_dtype,
        prepare=parts.step.prepare,
        channels_last=parts.step.channels_last,
    )
    bad = metrics.pop("bad_paths")
    check_strict_data(parts, bad)
    report_bad_files(parts, state, "validation", bad)
    parts.reporter.scalars({f"val/{k}": metrics[k] for k in ("loss", "top1", "top5")}, state.step)
    parts.reporter.print(
        f"epoch {state.epoch + 1}: val loss {metrics['loss']:.4f} top1 "
        f"{metrics['top1']:.2f}% top5 {metrics['top5']:.2f}% ({metrics['samples']} images)"
    )
    return metrics


def skip_or_abort_nonfinite(parts: Parts, state: TrainState, finite: bool) -> None:
    """Count a skipped (non-finite) step; past --max-nonfinite in a row, checkpoint the last
    good state and stop the run with NonFiniteAbort."""
    if finite:
        state.nonfinite_in_a_row = 0
        return
    state.nonfinite_total += 1
    state.nonfinite_in_a_row += 1
    parts.reporter.print(
        f"warning: non-finite gradient at step {state.step}: step skipped "
        f"({state.nonfinite_in_a_row} in a row, {state.nonfinite_total} in all)"
    )
    run = parts.settings.run
    if state.nonfinite_in_a_row >= run.max_nonfinite:
        save(parts, state)  # skipped steps left the weights at the last good state
        raise NonFiniteAbort(
            f"{state.nonfinite_in_a_row} non-finite step(s) in a row at step {state.step} "
            f"(--nonfinite {run.nonfinite}, --max-nonfinite {run.max_nonfinite}); the last "
            f"good state is checkpointed in {run.log_dir}"
        )


def _show_progress(parts: Parts, state: TrainState, started: float, first_step: int) -> None:
    if parts.reporter.live:
        rate = (state.step - first_step) / max(time.perf_counter() - started, 1e-9)
        plan, eta = parts.plan, eta_seconds(parts, state, rate)
        images_per_sec = rate * plan.global_batch_size
        parts.reporter.progress(
            state.epoch + 1, plan.epochs, state.step, plan.total_steps, images_per_sec, eta
        )


def _finished(parts: Parts, state: TrainState) -> bool:
    """The plan's last step (an adaptive batch: --epochs epochs of samples, or --max-steps)."""
    return parts.batch.finished(state) if parts.batch else state.step >= parts.plan.last_step


def train_one_epoch(parts: Parts, state: TrainState, meter: TrainMeter, stop) -> bool:
    """Train until the epoch ends, the plan's last step, or an agreed stop; True on a stop."""
    plan, run, batch = parts.plan, parts.settings.run, parts.batch
    done = state.step_in_epoch(plan)
    sampler = parts.data.train_sampler
    sampler.set_epoch(state.epoch)
    # resume inside the epoch (an adaptive batch counts the epoch's samples, not its steps)
    sampler.skip_samples = batch.epoch_offset() if batch else done * plan.samples_per_rank_per_step
    batches, bad_paths = iter(parts.data.train), []
    tick = started = time.perf_counter()
    tick_step = first_step = state.step
    stopped = False
    while batch.step_fits(sampler) if batch else done < plan.steps_per_epoch:
        if batch is not None:
            batch.before_step(state.step)
        finite = optimizer_step(parts.step, batches, meter, bad_paths)
        state.step, done = state.step + 1, done + 1
        if batch is not None and batch.after_step(parts, state):
            batches = iter(parts.data.train)  # a new micro-batch, from this rank's offset
        parts.watchdog.kick()
        check_strict_data(parts, bad_paths)
        _show_progress(parts, state, started, first_step)
        skip_or_abort_nonfinite(parts, state, finite)
        if state.step % run.log_interval == 0:
            now = time.perf_counter()
            log_train(parts, state, meter, state.step - tick_step, now - tick)
            tick, tick_step = now, state.step
        if run.checkpoint_every_steps and state.step % run.checkpoint_every_steps == 0:
            save(parts, state)
        stopped = stop.after_step()
        if stopped or _finished(parts, state):
            break
    if state.step != tick_step:  # the steps since the last train log
        log_train(parts, state, meter, state.step - tick_step, time.perf_counter() - tick)
    report_bad_files(parts, state, "training", bad_paths)
    return stopped


def finish_epoch(parts: Parts, state: TrainState, check=validate) -> None:
    """After an epoch (or the last step): `check` (validate; None: not now), next epoch, save."""
    metrics = check(parts, state)
    if metrics is not None:
        state.last_validation = {"epoch": state.epoch + 1, "step": state.step, **metrics}
    batch, sampler = parts.batch, parts.data.train_sampler
    if batch.end_epoch(sampler) if batch else state.step % parts.plan.steps_per_epoch == 0:
        state.epoch += 1
    save(parts, state)


def preempted(parts: Parts, state: TrainState, saved: bool) -> Preempted:
    where = f"; checkpoint in {parts.settings.run.log_dir}" if saved else ", before training"
    return Preempted(
        f"stopped by signal {parts.preemption.received} at step {state.step}{where}; "
        "run the same command again to resume"
    )


def fit(parts, state, train_epoch=train_one_epoch, end_epoch=finish_epoch, meter=None, finish=None):
    """Train from `state` to the plan's last step; the last validation's metrics, or a task's
    `finish(parts, state, seconds)`. `meter`: the task's step meter (default: loss, top-1)."""
    reporter, settings = parts.reporter, parts.settings
    describe(parts, state)
    reporter.save_config(run_config(parts, state))
    if _finished(parts, state):
        reporter.print(
            f"nothing to do: the checkpoint in {settings.run.log_dir} is at step {state.step}; "
            + describe_validation(state.last_validation)
        )
        return state.last_validation
    meter, started = meter or TrainMeter(parts.device), time.perf_counter()
    stop = StopAgreement(parts.dist, parts.preemption)
    if stop.after_step():  # a signal received during start-up: all ranks agree before step one
        raise preempted(parts, state, saved=False)  # nothing new to checkpoint
    parts.model.train()
    parts.watchdog.start()
    try:
        while not _finished(parts, state):
            if train_epoch(parts, state, meter, stop):
                stop.drain()
                save(parts, state)
                raise preempted(parts, state, saved=True)
            end_epoch(parts, state)
        stop.drain()
        if finish is not None:
            return finish(parts, state, time.perf_counter() - started)
        hidden = ("log_dir", "resume", "train_dir", "val_dir", "data_dir")
        last = state.last_validation
        reporter.hparams(
            {k: v for k, v in settings.flat().items() if k not in hidden},
            {"hparam/val_top1": last["top1"], "hparam/val_loss": last["loss"]},
        )
    finally:
        parts.watchdog.stop()
    skipped = state.nonfinite_total
    reporter.print(
        f"done: {state.step} steps in {time.perf_counter() - started:.1f} s; final val top1 "
        f"{last['top1']:.2f}% loss {last['loss']:.4f}"
        + (f"; {skipped} non-finite step(s) skipped" if skipped else "")
    )
    return last
