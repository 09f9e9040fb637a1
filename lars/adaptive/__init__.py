"""Adaptive batch size (AdAdaGrad: Lau, Liu & Kolar 2024, arXiv:2402.11215).

- :mod:`.statistics`: the norm, inner-product, orthogonality and augmented tests, the growth
  rule B = min(max(B, ceil(b_new)), max batch), optional EMA smoothing.
- :mod:`.micro_batch`: the nearly free estimator from the micro-batch gradients training computes.
- :mod:`.per_sample`: the reference's estimator, per-sample gradients with ``torch.func``.
- :mod:`.policy`: growth of (micro-batch, batches-per-allreduce), LR policies, the batch state.
- :mod:`.flags`: the trainer's flags, their checks, the policy in words (``--dry-run``).
- :mod:`.run`: ``AdaptiveBatch``, what the training loop calls before, inside and after a step.

How the trainer runs them: docs/adaptive-batch.md, "In the trainer".
"""

from .micro_batch import INNER_PRODUCT_MODES, MicroBatchEstimator, micro_batch_moments
from .per_sample import PerSampleEstimator, batch_norm_per_sample
from .policy import (
    GROWTH_ORDERS,
    LR_POLICIES,
    BatchController,
    BatchGrowth,
    BatchState,
    lr_factor,
)
from .statistics import (
    TEST_TYPES,
    Moments,
    Smoother,
    b_new,
    check_test_settings,
    inner_product_test,
    next_batch_size,
    norm_test,
    orthogonality_test,
)

__all__ = [
    "GROWTH_ORDERS",
    "INNER_PRODUCT_MODES",
    "LR_POLICIES",
    "TEST_TYPES",
    "BatchController",
    "BatchGrowth",
    "BatchState",
    "MicroBatchEstimator",
    "Moments",
    "PerSampleEstimator",
    "Smoother",
    "b_new",
    "batch_norm_per_sample",
    "check_test_settings",
    "inner_product_test",
    "lr_factor",
    "micro_batch_moments",
    "next_batch_size",
    "norm_test",
    "orthogonality_test",
]
