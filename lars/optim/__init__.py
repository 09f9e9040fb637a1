"""Optimizers for large-batch training: LARS, TVLARS and LAMB.

Each is a ``torch.optim.Optimizer`` with a multi-tensor (``torch._foreach_*``) path, used by
default, and a per-tensor loop (``foreach=False``) that is the reference it is tested against.
Each takes a ``variant`` (``VARIANTS``; the first, the paper's form, is the default) that selects
a published implementation's update rule; ``VARIANT_DEFAULTS`` lists each variant's own arguments.
"""

from .adagrad_norm import AdaGradNorm
from .lamb import LAMB
from .lars import LARS
from .tvlars import TVLARS

__all__ = ["LARS", "LAMB", "TVLARS", "AdaGradNorm"]
