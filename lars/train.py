"""The training system: data, model, optimizer, schedule, the step loop, evaluation, checkpoints.

`run(args)` trains with the resolved configuration of `lars.config`; every rank runs it and the
distributed runtime sits behind `lars.distributed`. One optimizer step consumes k =
`--batches-per-allreduce` micro-batches (`lars.step.optimizer_step` is the one place that
orders a step).
Each epoch runs `steps_per_epoch` whole optimizer steps (see `lars.plan`), so Horovod always sees
exactly k backward passes per step (horovod#2466).

What survives what (README, "Fault tolerance"): checkpoints hold everything needed to continue
bitwise (model, optimizer, schedule, epoch, step, position in the epoch, RNG states); SIGTERM or
SIGUSR1 stops every rank after the same step, checkpoints and exits with REQUEUE_EXIT_STATUS; a
non-finite gradient skips the step (or aborts) and never reaches a checkpoint; unreadable images
are skipped and counted.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict

import torch
import torch.nn as nn

from lars.checkpoint import (
    find_resume_checkpoint,
    load_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from lars.config import UsageError
from lars.data.fast import default_workers_per_rank, normalize_batch
from lars.data.loaders import CorruptSampleError, build_datasets, build_loaders
from lars.data.sample import build_sample_dataset
from lars.distributed import init_distributed, launched_rank
from lars.faults import (
    NONFINITE_EXIT_STATUS,
    REQUEUE_EXIT_STATUS,
    StopAgreement,
    Watchdog,
    install_preemption_handler,
    params_are_finite,
)
from lars.metrics import TrainMeter, evaluate
from lars.models import build_model
from lars.param_groups import param_group_summary
from lars.plan import data_config, default_log_dir, make_optimizer, plan_run, step_milestones
from lars.reporting import Reporter, format_duration, versions
from lars.schedules import build_scheduler
from lars.step import StepContext, optimizer_step

__all__ = ["REQUEUE_EXIT_STATUS", "NONFINITE_EXIT_STATUS", "Run", "run", "optimizer_step"]


class RunStopped(Exception):
    """Training ended early on purpose; `status` is the process exit status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Run:
    """Everything one training run holds; `train()` is the loop."""

    def __init__(self, args) -> None:
        self.args = args
        # Installed first, so a preemption signal during start-up is not lost.
        self.preemption = install_preemption_handler()
        cuda = torch.cuda.is_available() and not args.no_cuda
        # The data is checked before the distributed runtime starts: bad input costs nothing.
        if args.dataset == "sample":  # built on first use; safe when all ranks start at once
            root = build_sample_dataset(quiet=launched_rank() != 0)
            args.train_dir, args.val_dir = str(root / "train"), str(root / "val")
        data_cfg = data_config(args, args.workers)
        try:
            found = build_datasets(data_cfg)
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(str(error)) from None
        try:
            self.dist = dist = init_distributed(args.backend, cuda, args.stall_timeout)
        except RuntimeError as error:
            raise UsageError(str(error)) from None
        cores = os.cpu_count() or 1
        torch.set_num_threads(args.threads or max(1, cores // dist.local_size))
        if args.workers is None:
            args.workers = default_workers_per_rank(dist.local_size)
        data_cfg.workers = args.workers
        if cuda:
            torch.cuda.set_device(dist.local_rank)
            torch.backends.cudnn.benchmark = not args.deterministic
        if args.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.device = torch.device("cuda" if cuda else "cpu")
        torch.manual_seed(args.seed)

        self.data = build_loaders(data_cfg, dist.rank, dist.size, pin_memory=cuda, datasets_=found)
        self.plan = plan = plan_run(args, dist.size, self.data.train_size, self.data.val_size)
        args.log_dir = args.log_dir or default_log_dir(args, plan.global_batch_size)

        self.model = build_model(args.model, self.data.num_classes).to(self.device)
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
        self.scaler = torch.amp.GradScaler(self.device.type) if args.amp == "fp16" else None
        optimizer, self.groups = make_optimizer(args, self.model, plan)
        # Horovod rebuilds the optimizer as Cls(param_groups): wrap before loading any state.
        try:
            self.optimizer = dist.wrap_optimizer(
                optimizer,
                self.model,
                args.batches_per_allreduce,
                args.fp16_allreduce,
                args.use_adasum,
            )
        except ValueError as error:
            raise UsageError(str(error)) from None
        self.scheduler = build_scheduler(
            self.optimizer,
            schedule=args.schedule,
            total_steps=plan.total_steps,
            warmup_steps=plan.warmup_steps,
            end_lr=args.end_lr,
            power=args.lr_power,
            milestones=step_milestones(plan),
        )
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        self.names = {id(p): n for n, p in self.model.named_parameters()}
        self.epoch, self.global_step, self.final = 0, 0, None
        self.nonfinite_total = self.nonfinite_in_a_row = 0
        resumed = self._resume()
        dist.broadcast_model(self.model)
        # uint8 batches from the fast pipeline are normalised once per batch, on the device.
        self.prepare = (
            functools.partial(normalize_batch, device=self.device) if self.data.uint8 else None
        )
        forward_model = dist.wrap_model(self.model)  # DDP under --backend torch
        if args.compile:
            forward_model = torch.compile(forward_model)
        self.step_ctx = StepContext(
            model=forward_model,
            loss_fn=self.loss_fn,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            dist=dist,
            device=self.device,
            batches_per_allreduce=args.batches_per_allreduce,
            amp_dtype=self.amp_dtype,
            scaler=self.scaler,
            channels_last=args.channels_last,
            clip_grad_norm=args.clip_grad_norm,
            prepare=self.prepare,
        )
        # Events up to the checkpoint's step stay; later ones (from the lost work) are purged.
        self.reporter = Reporter(
            args.log_dir,
            enabled=dist.rank == 0,
            purge_step=self.global_step + 1 if resumed else None,
            progress=args.progress,
        )
        self.watchdog = Watchdog(
            args.stall_timeout, lambda: f"on rank {dist.rank} at step {self.global_step}"
        )

    # ----------------------------------------------------------------------------- checkpoints
    def _resume(self) -> bool:
        """Rank 0 chooses the checkpoint and broadcasts its contents; every rank loads them."""
        args, payload = self.args, None
        if self.dist.rank == 0 and args.resume != "none":
            if args.resume == "auto":
                found = find_resume_checkpoint(args.log_dir)
                payload = found[1] if found else None
            else:
                try:
                    payload = load_checkpoint(args.resume)
                except ValueError as error:
                    payload = {"error": str(error)}
        payload = self.dist.broadcast_object(payload)
        if payload is None:
            return False
        if "error" in payload:
            raise UsageError(f"--resume: {payload['error']}")
        if payload["global_batch_size"] != self.plan.global_batch_size:
            raise UsageError(
                f"--resume: the checkpoint was made with global batch "
                f"{payload['global_batch_size']}, this run has {self.plan.global_batch_size}; "
                "use the same batch size, ranks and --batches-per-allreduce (or --resume none)"
            )
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.scaler is not None and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self.epoch, self.global_step = payload["epoch"], payload["global_step"]
        self.final = payload.get("final")
        self.nonfinite_total = payload.get("nonfinite_steps", 0)
        set_rng_states(payload["rng"])
        return True

    def save(self) -> None:
        """Rank 0 writes a checkpoint of the current state; never one holding NaN or inf."""
        if self.dist.rank != 0:
            return
        if not params_are_finite(self.model):
            self.reporter.print(
                "warning: not writing a checkpoint: the model holds non-finite values"
            )
            return
        payload = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "global_step": self.global_step,
            "step_in_epoch": self.global_step - self.epoch * self.plan.steps_per_epoch,
            "global_batch_size": self.plan.global_batch_size,
            "final": self.final,
            "nonfinite_steps": self.nonfinite_total,
            "rng": rng_states(),
            "config": {
                k: v
                for k, v in vars(self.args).items()
                if isinstance(v, (int, float, str, bool, type(None)))
            },
        }
        save_checkpoint(payload, self.args.log_dir, self.global_step, self.args.keep_checkpoints)
        self.watchdog.kick()

    # ----------------------------------------------------------------------------- reporting
    def config(self) -> dict:
        args = {k: v for k, v in vars(self.args).items() if not k.startswith("_")}
        return {
            "args": args,
            "plan": asdict(self.plan),
            "backend": self.dist.name,
            "device": str(self.device),
            "versions": versions(),
            "threads": torch.get_num_threads(),
        }

    def describe(self) -> None:
        r, plan, args = self.reporter, self.plan, self.args
        if self.dist.notice:
            r.print(self.dist.notice)
        r.print(
            f"run: {args.dataset} {args.model} {args.base_op} on {plan.world_size} rank(s) "
            f"({self.dist.name}, {self.device}); log dir {args.log_dir}"
        )
        r.print(
            f"global batch {plan.global_batch_size} = {args.batch_size} x {plan.world_size} "
            f"x {args.batches_per_allreduce}; lr {plan.lr:.6g} ({args.lr_scaling} scaling of "
            f"{args.base_lr:g}); {plan.steps_per_epoch} steps/epoch, {plan.total_steps} "
            f"steps, {plan.warmup_steps} warm-up steps, schedule {args.schedule}"
        )
        r.print(param_group_summary(self.model, self.groups))
        if self.global_step:
            r.print(
                f"resumed at step {self.global_step} (epoch {self.epoch + 1}, step "
                f"{self.global_step - self.epoch * plan.steps_per_epoch} of it)"
            )

    def eta(self, steps_per_second: float) -> float:
        remaining = min(self.args.max_steps or self.plan.total_steps, self.plan.total_steps)
        return (remaining - self.global_step) / max(steps_per_second, 1e-9)

    def log_train(self, meter: TrainMeter, images: int, seconds: float) -> None:
        stats = meter.read_and_reset(self.dist)  # every rank joins this allreduce
        if self.dist.rank != 0:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        values = {
            "train/loss": stats["loss"],
            "train/top1": stats["top1"],
            "train/lr": lr,
            "train/images_per_sec": images / max(seconds, 1e-9),
        }
        trust = getattr(self.optimizer, "last_trust_ratios", None)
        if trust is not None:
            for param, ratio in trust():
                values[f"trust_ratio/{self.names.get(id(param), 'unnamed')}"] = float(ratio)
        phi = getattr(self.optimizer, "last_phi", None)
        if phi is not None:
            values["tvlars/phi"] = float(phi)
        self.reporter.scalars(values, self.global_step)
        eta = self.eta(values["train/images_per_sec"] / self.plan.global_batch_size)
        self.reporter.print(
            f"epoch {self.epoch + 1}/{self.args.epochs} step {self.global_step}/"
            f"{self.plan.total_steps}: loss {stats['loss']:.4f} top1 {stats['top1']:.2f}% "
            f"lr {lr:.5g} {values['train/images_per_sec']:.1f} img/s "
            f"ETA {format_duration(eta)}"
        )

    def report_bad_files(self, where: str, paths: list[str]) -> None:
        every = [p for rank_paths in self.dist.allgather_object(paths) for p in rank_paths]
        if every:
            shown = ", ".join(every[:5]) + (" ..." if len(every) > 5 else "")
            self.reporter.print(
                f"warning: {len(every)} unreadable file(s) skipped in {where} "
                f"(epoch {self.epoch + 1}): {shown}"
            )

    def validate(self) -> dict[str, float]:
        metrics = evaluate(
            self.model,
            self.data.val,
            self.dist,
            self.device,
            progress=self.watchdog.kick,
            amp_dtype=self.amp_dtype,
            prepare=self.prepare,
            channels_last=self.args.channels_last,
        )
        self.report_bad_files("validation", metrics.pop("bad_paths"))
        self.reporter.scalars(
            {f"val/{k}": metrics[k] for k in ("loss", "top1", "top5")}, self.global_step
        )
        self.reporter.print(
            f"epoch {self.epoch + 1}: val loss {metrics['loss']:.4f} top1 "
            f"{metrics['top1']:.2f}% top5 {metrics['top5']:.2f}% "
            f"({metrics['samples']} images)"
        )
        return metrics

    # ----------------------------------------------------------------------------- the loop
    def count_step(self, finite: bool) -> None:
        if finite:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_in_a_row += 1
        self.reporter.print(
            f"warning: non-finite gradient at step {self.global_step}: step "
            f"skipped ({self.nonfinite_in_a_row} in a row, "
            f"{self.nonfinite_total} in all)"
        )
        if self.nonfinite_in_a_row >= self.args.max_nonfinite:
            self.save()  # skipped steps left the weights at the last good state
            raise RunStopped(
                NONFINITE_EXIT_STATUS,
                f"{self.nonfinite_in_a_row} non-finite step(s) in a row at step "
                f"{self.global_step} (--nonfinite {self.args.nonfinite}, "
                f"--max-nonfinite {self.args.max_nonfinite}); the last good state "
                f"is checkpointed in {self.args.log_dir}",
            )

    def train_epoch(self, meter: TrainMeter, stop: StopAgreement, max_steps: int) -> bool:
        """Train until the epoch ends, max_steps, or an agreed stop; True if it was a stop."""
        args, plan = self.args, self.plan
        done_in_epoch = self.global_step - self.epoch * plan.steps_per_epoch
        sampler = self.data.train_sampler
        sampler.set_epoch(self.epoch)
        sampler.skip_samples = done_in_epoch * args.batches_per_allreduce * args.batch_size
        batches, bad_paths = iter(self.data.train), []
        tick, tick_step = time.perf_counter(), self.global_step
        epoch_started, epoch_first_step = tick, tick_step
        stopped = False
        for _ in range(done_in_epoch, plan.steps_per_epoch):
            finite = optimizer_step(self.step_ctx, batches, meter, bad_paths)
            self.global_step += 1
            self.watchdog.kick()
            if self.reporter.live:
                elapsed = max(time.perf_counter() - epoch_started, 1e-9)
                rate = (self.global_step - epoch_first_step) / elapsed
                self.reporter.progress(
                    self.epoch + 1,
                    args.epochs,
                    self.global_step,
                    plan.total_steps,
                    rate * plan.global_batch_size,
                    self.eta(rate),
                )
            self.count_step(finite)
            if self.global_step % args.log_interval == 0:
                now = time.perf_counter()
                self.log_train(
                    meter, (self.global_step - tick_step) * plan.global_batch_size, now - tick
                )
                tick, tick_step = now, self.global_step
            if args.checkpoint_every_steps and self.global_step % args.checkpoint_every_steps == 0:
                self.save()
            stopped = stop.after_step()
            if stopped or self.global_step >= max_steps:
                break
        if self.global_step != tick_step:  # the steps since the last train log
            self.log_train(
                meter,
                (self.global_step - tick_step) * plan.global_batch_size,
                time.perf_counter() - tick,
            )
        self.report_bad_files("training", bad_paths)
        return stopped

    def train(self) -> dict | None:
        args, plan = self.args, self.plan
        self.describe()
        self.reporter.save_config(self.config())
        max_steps = min(args.max_steps or plan.total_steps, plan.total_steps)
        if self.global_step >= max_steps:
            self.reporter.print(
                f"nothing to do: the checkpoint in {args.log_dir} is at step "
                f"{self.global_step}; final {self.final}"
            )
            return self.final
        meter, started = TrainMeter(self.device), time.perf_counter()
        handler = self.preemption
        stop = StopAgreement(self.dist, handler)
        self.model.train()
        self.watchdog.start()
        try:
            while self.global_step < max_steps:
                stopped = self.train_epoch(meter, stop, max_steps)
                if stopped:
                    stop.drain()
                    self.save()
                    raise RunStopped(
                        REQUEUE_EXIT_STATUS,
                        f"stopped by signal {handler.received} at step "
                        f"{self.global_step}; checkpoint in {args.log_dir}; run the "
                        "same command again to resume",
                    )
                metrics = self.validate()
                self.final = {"epoch": self.epoch + 1, "step": self.global_step, **metrics}
                if self.global_step % plan.steps_per_epoch == 0:
                    self.epoch += 1
                self.save()
            stop.drain()
            self.reporter.hparams(
                {
                    k: v
                    for k, v in vars(args).items()
                    if not k.startswith("_")
                    and k not in ("log_dir", "resume", "train_dir", "val_dir", "data_dir")
                },
                {"hparam/val_top1": self.final["top1"], "hparam/val_loss": self.final["loss"]},
            )
        except CorruptSampleError as error:
            # From a DataLoader worker the message carries the worker's traceback: keep our line.
            lines = [line for line in str(error).splitlines() if "unreadable file" in line]
            text = lines[-1] if lines else str(error)
            raise UsageError(text[text.find("unreadable file") :]) from None
        finally:
            self.watchdog.stop()
        self.reporter.print(
            f"done: {self.global_step} steps in "
            f"{time.perf_counter() - started:.1f} s; final val top1 "
            f"{self.final['top1']:.2f}% loss {self.final['loss']:.4f}"
            + (
                f"; {self.nonfinite_total} non-finite step(s) skipped"
                if self.nonfinite_total
                else ""
            )
        )
        return self.final

    def close(self) -> None:
        self.preemption.uninstall()
        self.reporter.close()
        self.dist.shutdown()


def run(args) -> dict | None:
    trainer = Run(args)
    try:
        return trainer.train()
    finally:
        trainer.close()
