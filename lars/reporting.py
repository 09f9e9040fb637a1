"""What rank 0 shows: console lines, TensorBoard scalars and the resolved configuration.

Other ranks get a reporter that does nothing, so they print nothing but errors.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path


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
