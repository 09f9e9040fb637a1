"""The batch-size tests of AdAdaGrad (Lau, Liu & Kolar 2024, arXiv:2402.11215) and the growth rule.

Notation (one test step; sums run over every parameter tensor T of the model): g_i the per-sample
gradients of a batch of b samples, g-bar their mean, Var_i the unbiased sample variance over i
(correction 1), taken per coordinate and summed over coordinates::

    norm test (Byrd et al. 2012):            b_new = sum Var_i(g_i) / (eta^2 ||g-bar||^2)
    inner-product test (Bollapragada et al. 2018):
                                 b_new = sum_T Var_i(<g_i, g-bar>_T) / (theta^2 ||g-bar||^4)
    orthogonality test: o_i = g_i - (<g_i, g-bar>_T / ||g-bar_T||^2) g-bar_T   (per tensor T)
                                             b_new = sum Var_i(o_i) / (nu^2 ||g-bar||^2)
    augmented inner-product test:            b_new = max(inner-product, orthogonality)
    growth rule (the batch never shrinks):   B = min(max(B, ceil(b_new)), max batch)

Per tensor, for any fixed direction u (here g-bar_T), projecting out u splits the variance:
sum Var_i(o_i) = sum Var_i(g_i) - Var_i(<g_i, u>) / ||u||^2 (Pythagoras on the centred samples),
so the orthogonality numerator needs only per-tensor scalars; the estimators use that identity and
the tests check it against o_i built explicitly.

Every estimator reduces its samples to :class:`Moments` (a few float64 numbers), and
:func:`b_new` turns moments into the test's batch size. :class:`Smoother` is the optional EMA of
numerators and denominators, kept separately (a ratio of averages, not an average of ratios).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

TEST_TYPES = ("none", "norm", "ip", "ip+orth")


@dataclass(frozen=True)
class Moments:
    """What a test needs, in float64 host numbers (per-sample units, whatever the estimator).

    var_norm: sum over coordinates of Var_i(g_i) (for the micro-batch estimator: tr Sigma).
    var_inner_product: sum_T Var_i(<g_i, g-bar>_T), or nan when not computed.
    var_orth: sum over coordinates of Var_i(o_i), or nan when not computed.
    grad_norm_sq: ||g-bar||^2.
    grad_norm_sq_unbiased: an unbiased estimate of ||E g||^2 (nan when unknown).
    samples: how many samples (per-sample gradients or micro-batches) the moments came from.
    """

    var_norm: float
    var_inner_product: float
    var_orth: float
    grad_norm_sq: float
    grad_norm_sq_unbiased: float = math.nan
    samples: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def b_simple(self) -> float:
        """McCandlish et al. (2018)'s simple noise scale tr Sigma / |G|^2 (inf when |G|^2 <= 0)."""
        g2 = self.grad_norm_sq_unbiased
        if not math.isfinite(g2):
            g2 = self.grad_norm_sq
        return self.var_norm / g2 if g2 > 0 else math.inf


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; inf when the denominator is 0 (a zero gradient: noise dominates),
    nan when either is nan (nothing is decided from a nan)."""
    if math.isnan(numerator) or math.isnan(denominator):
        return math.nan
    if denominator <= 0.0:
        return math.inf if numerator > 0.0 else 0.0
    return numerator / denominator


def norm_test(m: Moments, eta: float) -> float:
    """b_new = sum Var(g_i) / (eta^2 ||g-bar||^2)."""
    return _ratio(m.var_norm, eta**2 * m.grad_norm_sq)


def inner_product_test(m: Moments, theta: float) -> float:
    """b_new = sum_T Var(<g_i, g-bar>_T) / (theta^2 ||g-bar||^4)."""
    return _ratio(m.var_inner_product, theta**2 * m.grad_norm_sq**2)


def orthogonality_test(m: Moments, nu: float) -> float:
    """b_new = sum Var(o_i) / (nu^2 ||g-bar||^2)."""
    return _ratio(m.var_orth, nu**2 * m.grad_norm_sq)


def b_new(m: Moments, test_type: str, eta=0.1, theta=0.1, nu=0.1) -> float:
    """The batch size the test asks for (a real number; nan when it cannot tell)."""
    if test_type == "norm":
        return norm_test(m, eta)
    if test_type == "ip":
        return inner_product_test(m, theta)
    if test_type == "ip+orth":
        ip, orth = inner_product_test(m, theta), orthogonality_test(m, nu)
        return math.nan if math.isnan(ip) or math.isnan(orth) else max(ip, orth)
    raise ValueError(f"test_type must be one of {TEST_TYPES[1:]}, not {test_type!r}")


def next_batch_size(batch: int, wanted: float, max_batch: int) -> int:
    """B = min(max(B, ceil(b_new)), max batch); a nan test leaves B as it is."""
    if math.isnan(wanted):
        return batch
    grown = max_batch if math.isinf(wanted) else max(batch, math.ceil(wanted))
    return min(grown, max_batch)


def check_test_settings(test_type: str, eta: float, theta: float, nu: float) -> None:
    """ValueError naming the flag for an unknown test type or a non-positive tolerance."""
    if test_type not in TEST_TYPES:
        raise ValueError(f"--test-type must be one of {', '.join(TEST_TYPES)}, not {test_type!r}")
    for flag, value in (("--eta", eta), ("--theta", theta), ("--nu", nu)):
        if not value > 0.0:
            raise ValueError(f"{flag} must be > 0, got {value!r}")


class Smoother:
    """Exponential moving averages of the numerators and of ||g-bar||^2, each on its own,
    with bias correction (the first smoothed value is the raw one):
    ema_t = beta ema_{t-1} + (1 - beta) x_t, reported as ema_t / (1 - beta^t). beta = 0: no
    smoothing. nan inputs (a statistic not computed) leave that average untouched."""

    FIELDS = ("var_norm", "var_inner_product", "var_orth", "grad_norm_sq", "grad_norm_sq_unbiased")

    def __init__(self, beta: float = 0.0) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"--batch-test-ema must be in [0, 1), got {beta!r}")
        self.beta = beta
        self.sums = {name: 0.0 for name in self.FIELDS}
        self.counts = {name: 0 for name in self.FIELDS}

    def update(self, m: Moments) -> Moments:
        if self.beta == 0.0:
            return m
        out = {}
        for name in self.FIELDS:
            x = getattr(m, name)
            if not math.isnan(x):
                self.sums[name] = self.beta * self.sums[name] + (1.0 - self.beta) * x
                self.counts[name] += 1
            n = self.counts[name]
            out[name] = self.sums[name] / (1.0 - self.beta**n) if n else math.nan
        return Moments(**out, samples=m.samples)

    def state_dict(self) -> dict:
        return {"beta": self.beta, "sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])
        self.sums = {name: float(state["sums"][name]) for name in self.FIELDS}
        self.counts = {name: int(state["counts"][name]) for name in self.FIELDS}
