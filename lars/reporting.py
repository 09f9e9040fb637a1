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

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "torchvision": torchvision.__version__}
    try:
        import horovod

        found["horovod"] = horovod.__version__
    except ImportError:
        found["horovod"] = "not installed"
    return found


class Reporter:
    """Console and TensorBoard output of rank 0."""

    def __init__(self, log_dir: str, enabled: bool, purge_step: int | None = None) -> None:
        self.enabled = enabled
        self.log_dir = Path(log_dir)
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            # purge_step drops events written after the checkpoint we resume from, so curves
            # do not fold back on themselves.
            self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)

    def print(self, *parts) -> None:
        if self.enabled:
            print(*parts, flush=True)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

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
            self.writer.flush()
            self.writer.close()


def error(message: str, rank: int = 0) -> None:
    """One line on stderr, from rank 0 only (every rank hits the same bad input)."""
    if rank == 0:
        print(f"pytorch_imagenet_resnet.py: error: {message}", file=sys.stderr, flush=True)
