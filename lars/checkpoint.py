"""Checkpoints: written atomically by rank 0, loaded safely, the newest valid one found on resume.

A checkpoint is one file `checkpoint-<step>.pt` in the run's log dir. It is written to a temporary
file in the same folder, flushed and fsynced, then renamed over the final name, so a crash never
leaves a half-written checkpoint under a real name. Loading uses `torch.load(weights_only=True)`,
which refuses pickled code. Only the newest `keep` files are kept.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

FORMAT_VERSION = 1
_PATTERN = re.compile(r"^checkpoint-(\d+)\.pt$")


def checkpoint_path(log_dir: str | os.PathLike, step: int) -> Path:
    return Path(log_dir) / f"checkpoint-{step:09d}.pt"


def list_checkpoints(log_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints in `log_dir`, newest (highest step) first."""
    folder = Path(log_dir)
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), folder / name)
        for name in os.listdir(folder)
        if (m := _PATTERN.match(name))
    ]
    return [path for _, path in sorted(found, reverse=True)]


def save_checkpoint(payload: dict, log_dir: str | os.PathLike, step: int, keep: int) -> Path:
    final = checkpoint_path(log_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format_version": FORMAT_VERSION, **payload}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    for old in list_checkpoints(log_dir)[keep:]:
        old.unlink(missing_ok=True)
    return final


def rng_states() -> dict:
    """Every RNG the run uses, in types `torch.load(weights_only=True)` accepts.

    Data augmentation does not depend on these: each sample's RNG is seeded from
    (seed, epoch, index) in the loader, in whichever worker loads it.
    """
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    import random

    import numpy as np

    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"])
    )
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load safely (no pickled code). Raises ValueError for a file that is not a checkpoint."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt, or holding objects other than tensors
        raise ValueError(
            f"checkpoint {str(path)!r} is unreadable or unsafe: {str(error).splitlines()[0]}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r} is not a checkpoint of this project "
            f"(format version {FORMAT_VERSION})"
        )
    return payload


def find_resume_checkpoint(log_dir: str | os.PathLike, report=print) -> tuple[Path, dict] | None:
    """Newest checkpoint in `log_dir` that loads; a corrupt newer one is reported and skipped."""
    for path in list_checkpoints(log_dir):
        try:
            return path, load_checkpoint(path)
        except ValueError as error:
            report(f"warning: skipping {error}")
    return None
