"""lars: exact, fast LARS, TVLARS and LAMB for large-batch training, with schedules and LR scaling.

    from lars import LARS, param_groups
    optimizer = LARS(param_groups(model, weight_decay=1e-4), lr=5.0, momentum=0.9)

The names below are imported on first use, so `import lars.signals` (the entry script's first
line) does not load torch; the training system (`lars.train`) is imported on demand, and Horovod
only by `lars.distributed` when it is used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "LAMB": "lars.optim",
    "LARS": "lars.optim",
    "TVLARS": "lars.optim",
    "OPTIMIZERS": "lars.factory",
    "build_optimizer": "lars.factory",
    "param_group_summary": "lars.param_groups",
    "param_groups": "lars.param_groups",
    "SCHEDULES": "lars.schedules",
    "build_scheduler": "lars.schedules",
    "epochs_to_steps": "lars.schedules",
    "lr_at": "lars.schedules",
    "scale_lr": "lars.schedules",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lars' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
