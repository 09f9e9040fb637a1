"""Optimizers for large-batch training: LARS, TVLARS and LAMB.

Each is a ``torch.optim.Optimizer`` with three paths: on CPU tensors, by default, a fused C++
kernel that makes the fewest passes over each tensor (:mod:`lars.optim._fused`, built on first use
and cached; ``fused=False`` or ``foreach=True`` opts out, and without a compiler the step falls
back with one warning); a multi-tensor (``torch._foreach_*``) path, the default elsewhere; and a
per-tensor loop (``foreach=False``) that is the reference the others are tested against.
Each takes a ``variant`` (``VARIANTS``; the first, the paper's form, is the default) that selects
a published implementation's update rule; ``VARIANT_DEFAULTS`` lists each variant's own arguments.
"""

from .adagrad_norm import AdaGradNorm
from .lamb import LAMB
from .lars import LARS
from .tvlars import TVLARS

__all__ = ["LARS", "LAMB", "TVLARS", "AdaGradNorm"]
