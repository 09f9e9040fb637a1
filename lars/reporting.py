"""What rank 0 shows: console lines, TensorBoard scalars and the resolved configuration.

Other ranks get a reporter that does nothing, so they print nothing but errors. The second half
(`describe`, `log_train`, `run_config`, ...) writes a run's lines from its `lars.train.Parts`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lars.build import describe_split
from lars.fingerprint import fingerprint, format_value
from lars.param_groups import param_group_summary
from lars.resume import identity, setting_name

if TYPE_CHECKING:
    from lars.metrics import TrainMeter
    from lars.state import TrainState
    from lars.train import Parts


def versions() -> dict[str, str]:
    import torch
    import torchvision

    try:
        from horovod import __version__ as horovod
    except ImportError:
        horovod = "not installed"
    python = platform.python_version()
    return dict(
        python=python, torch=torch.__version__, torchvision=torchvision.__version__, horovod=horovod
    )


class Reporter:
    """Console and TensorBoard output of rank 0."""

    def __init__(self, log_dir: str, enabled: bool, purge_step=None, progress="auto") -> None:
        self.enabled, self.log_dir, self.writer = enabled, Path(log_dir), None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            # purge_step drops events written after the checkpoint we resume from, so curves
            # do not fold back on themselves.
            self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)

        # A live progress bar on a terminal; in log files the periodic lines suffice. Under
        # mpirun or srun a rank's stdout is a pseudo-terminal even when the job's output goes to
        # a file, so "auto" shows the bar only to a process that no MPI launcher started.
        launchers = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")
        under_launcher = any(v in os.environ for v in launchers)
        self.live = enabled and (
            progress == "bar" or (progress == "auto" and sys.stdout.isatty() and not under_launcher)
        )
        self._bar_shown = False

    def print(self, *parts) -> None:
        if self.enabled:
            if self._bar_shown:  # finish the bar's line first
                print(flush=True)
                self._bar_shown = False
            print(*parts, flush=True)

    def progress(self, epoch, epochs, step, total, images_per_sec: float, eta_seconds: float):
        """Redraw the one-line progress bar (terminal only): epoch of epochs, step of total."""
        if not self.live:
            return
        filled = int(30 * step / max(total, 1))  # of a bar 30 characters wide
        bar = "#" * filled + "." * (30 - filled)
        sys.stdout.write(
            f"\repoch {epoch}/{epochs} [{bar}] {step}/{total} "
            f"{images_per_sec:.0f} img/s ETA {format_duration(eta_seconds)}   "
        )
        sys.stdout.flush()
        self._bar_shown = True

    def hparams(self, hyperparameters: dict, metrics: dict) -> None:
        """The run's settings and final metrics for TensorBoard's HParams tab."""
        if self.writer is None:
            return
        plain = (int, float, str, bool)
        clean = {k: v if isinstance(v, plain) else str(v) for k, v in hyperparameters.items()}
        self.writer.add_hparams(clean, metrics, run_name=".")

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def save_config(self, config: dict) -> None:
        if not self.enabled:
            return
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        tmp = self.log_dir / "config.json.tmp"
        tmp.write_text(text + "\n")
        os.replace(tmp, self.log_dir / "config.json")
        if self.writer is not None:
            self.writer.add_text("config", "```\n" + text + "\n```", 0)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()  # flushes first


def describe_validation(last: dict | None) -> str:
    """The last validation in words, for console lines (None: not validated yet)."""
    if not last:
        return "no validation yet"
    shown = [f"{k} {last[k]:.2f}%" for k in ("top1", "top5") if k in last]
    shown += [f"loss {last['loss']:.4f}"] if "loss" in last else []
    return f"last validation (epoch {last.get('epoch', '?')}): {' '.join(shown)}"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ------------------------------------------------------------------- a run's lines (rank 0)
def run_config(parts: Parts, state: TrainState) -> dict:
    """What config.json holds."""
    import torch

    return {
        "args": parts.settings.flat(),
        "fingerprint": fingerprint(identity(parts.settings, parts.plan)),
        "changes": state.changes,
        "plan": parts.plan.to_dict(),
        "backend": parts.dist.name,
        "device": str(parts.device),
        "versions": versions(),
        "threads": torch.get_num_threads(),
    }


def describe(parts: Parts, state: TrainState) -> None:
    r, plan, s = parts.reporter, parts.plan, parts.settings
    if parts.dist.notice:
        r.print(parts.dist.notice)
    r.print(
        f"run: {s.data.dataset} {s.model.model} {s.optimizer.base_op} on {plan.world_size} "
        f"rank(s) ({parts.dist.name}, {parts.device}); log dir {s.run.log_dir}\n"
        f"global batch {plan.global_batch_size} = {plan.micro_batch} x {plan.world_size} "
        f"x {plan.batches_per_allreduce}; lr {plan.lr:.6g} ({s.optimizer.lr_scaling} scaling "
        f"of {s.optimizer.base_lr:g}); {plan.steps_per_epoch} steps/epoch, {plan.total_steps} "
        f"steps, {plan.warmup_steps} warm-up steps, schedule {s.schedule.schedule}\n"
        f"parameter groups: {describe_split(s)}\n{param_group_summary(parts.model, parts.groups)}"
    )
    for line in parts.batch.describe() if parts.batch else ():
        r.print(line)
    if state.step:
        r.print(
            f"resumed at step {state.step} (epoch {state.epoch + 1}, step "
            f"{state.step_in_epoch(plan)} of it)"
        )
    if state.changed_now:
        line = ", ".join(
            f"{setting_name(c['setting'])} {format_value(c['old'])} -> {format_value(c['new'])}"
            for c in state.changed_now
        )
        r.print(f"changed with --allow-change: {line} at step {state.step}")
        r.text("run/changes", f"step {state.step}: {line}", state.step)


def eta_seconds(parts: Parts, state: TrainState, steps_per_second: float) -> float:
    if parts.batch:  # a growing batch: the samples left at the current batch's rate
        rate = steps_per_second * parts.batch.plan.global_batch_size
        return parts.batch.samples_left() / max(rate, 1e-9)
    return (parts.plan.last_step - state.step) / max(steps_per_second, 1e-9)


def log_train(parts: Parts, state: TrainState, meter: TrainMeter, steps: int, seconds: float):
    stats = meter.read_and_reset(parts.dist)  # every rank joins this allreduce
    if parts.dist.rank != 0:
        return
    optimizer, names = parts.step.optimizer, {id(p): n for n, p in parts.model.named_parameters()}
    batch = (parts.batch.plan if parts.batch else parts.plan).global_batch_size
    lr, rate = optimizer.param_groups[0]["lr"], steps * batch / max(seconds, 1e-9)
    values = {**meter.tags(stats), "train/lr": lr}
    values["train/images_per_sec"] = rate
    trust = getattr(optimizer, "last_trust_ratios", None)
    for param, ratio in trust() if trust is not None else ():
        values[f"trust_ratio/{names.get(id(param), 'unnamed')}"] = float(ratio)
    phi = getattr(optimizer, "last_phi", None)
    if phi is not None:
        values["tvlars/phi"] = float(phi)
    parts.reporter.scalars(values, state.step)
    eta = eta_seconds(parts, state, rate / batch)
    parts.reporter.print(
        f"epoch {state.epoch + 1}/{parts.plan.epochs} step {state.step}/"
        f"{parts.plan.total_steps}: {meter.summary(stats)} "
        f"lr {lr:.5g} {rate:.1f} img/s ETA {format_duration(eta)}"
    )


def report_bad_files(parts: Parts, state: TrainState, where: str, paths: list[str]) -> None:
    every = [p for rank_paths in parts.dist.allgather_object(paths) for p in rank_paths]
    if every:
        shown = ", ".join(every[:5]) + (" ..." if len(every) > 5 else "")
        parts.reporter.print(
            f"warning: {len(every)} unreadable file(s) skipped in {where} "
            f"(epoch {state.epoch + 1}): {shown}"
        )
