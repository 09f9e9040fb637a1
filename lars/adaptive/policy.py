"""How the batch grows, how the learning rate follows it, and the batch state a checkpoint keeps.

Geometry: B = micro-batch b (per rank) x ranks W x batches-per-allreduce k. When a test asks for
B* (already capped: B* = min(max(B, ceil(b_new)), max batch), see
:func:`lars.adaptive.statistics.next_batch_size`), :meth:`BatchGrowth.geometry_for` picks the
new (b, k) that never shrinks either factor and never passes ``max_batch`` or ``max_micro_batch``:

- ``order="accumulation"`` (the default): grow k first (Horovod's
  ``set_backward_passes_per_step`` / DDP's ``no_sync`` count, changed between steps: no new
  workers, no new loader), k = ceil(B* / (b W)); once k would pass ``max_batches_per_allreduce``
  the micro-batch grows up to ``max_micro_batch`` (both caps are hard: ``check`` refuses caps
  whose product cannot reach ``max_batch``; without a k cap the micro-batch never grows).
- ``order="micro-batch"``: AdAdaGrad's reference order, b first up to its cap, then k.

Learning rate when B changes from the start batch B0 (``lr_factor``), a multiplier of the
schedule's rate: ``none`` 1 (the paper's), ``sqrt`` sqrt(B / B0), ``linear`` B / B0, ``adascale``
the gain ratio of AdaScale (Johnson, Agrawal, Gu & Guestrin 2020) with the simple noise scale
B_simple = tr Sigma / |G|^2 of McCandlish et al. (2018):
r = (1 + B_simple / B0) / (1 + B_simple / B), between 1 and B / B0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .statistics import Moments, Smoother, b_new, check_test_settings, next_batch_size

LR_POLICIES = ("none", "sqrt", "linear", "adascale")
GROWTH_ORDERS = ("accumulation", "micro-batch")


def lr_factor(policy: str, batch: int, start_batch: int, b_simple: float = math.nan) -> float:
    """The LR multiplier for batch B against the start batch B0 (see the module docstring);
    ``adascale`` with an unknown (nan) noise scale keeps 1, with an infinite one gives B / B0."""
    scale = batch / start_batch
    if policy == "none":
        return 1.0
    if policy == "sqrt":
        return math.sqrt(scale)
    if policy == "linear":
        return scale
    if policy == "adascale":
        if math.isnan(b_simple):
            return 1.0
        if math.isinf(b_simple):
            return scale
        b_simple = max(b_simple, 0.0)
        return (1.0 + b_simple / start_batch) / (1.0 + b_simple / batch)
    raise ValueError(f"--batch-lr-policy must be one of {', '.join(LR_POLICIES)}, not {policy!r}")


@dataclass(frozen=True)
class BatchGrowth:
    """The caps: ``max_batch`` (global), ``max_micro_batch`` (per rank, what fits memory) and,
    for ``order="accumulation"``, ``max_batches_per_allreduce`` (where k stops and the micro-batch
    starts growing; None: k alone grows)."""

    world_size: int
    max_batch: int
    max_micro_batch: int
    max_batches_per_allreduce: int | None = None
    order: str = "accumulation"

    def check(self, micro_batch: int, batches_per_allreduce: int) -> None:
        """ValueError naming the flag when the caps cannot hold the start or reach the max."""
        start = micro_batch * self.world_size * batches_per_allreduce
        if self.order not in GROWTH_ORDERS:
            raise ValueError(f"growth order must be one of {GROWTH_ORDERS}, not {self.order!r}")
        if self.max_batch < start:
            raise ValueError(f"--max-batch-size {self.max_batch} is below the start batch {start}")
        if self.max_micro_batch < micro_batch:
            raise ValueError(
                f"--max-micro-batch-size {self.max_micro_batch} is below --batch-size {micro_batch}"
            )
        k_cap = self.max_batches_per_allreduce
        if k_cap is not None and self.max_micro_batch * self.world_size * k_cap < self.max_batch:
            raise ValueError(
                f"--max-micro-batch-size {self.max_micro_batch} x {self.world_size} ranks x "
                f"{k_cap} batches per allreduce cannot reach --max-batch-size {self.max_batch}"
            )

    def geometry_for(self, micro: int, k: int, target: int) -> tuple[int, int]:
        """(micro-batch, k) for a global batch of at least ``target`` where the caps allow it
        (else the largest below ``max_batch``); neither factor ever decreases."""
        w, target = self.world_size, min(target, self.max_batch)
        if target <= micro * w * k:
            return micro, k
        if self.order == "micro-batch":
            new_micro = min(self.max_micro_batch, max(micro, math.ceil(target / (w * k))))
            new_k = max(k, math.ceil(target / (w * new_micro)))
        else:
            k_cap = self.max_batches_per_allreduce or math.inf
            new_k, new_micro = math.ceil(target / (w * micro)), micro
            if new_k > k_cap:
                new_k = max(k, int(k_cap))
                new_micro = min(self.max_micro_batch, max(micro, math.ceil(target / (w * new_k))))
        return self._fit(micro, k, new_micro, new_k)

    def _fit(self, micro: int, k: int, new_micro: int, new_k: int) -> tuple[int, int]:
        """Round the grown geometry down until it fits ``max_batch`` (never below the old one)."""
        w = self.world_size
        if new_micro * w * new_k > self.max_batch:
            new_k = max(k, self.max_batch // (w * new_micro))
        if new_micro * w * new_k > self.max_batch:
            new_micro = max(micro, self.max_batch // (w * new_k))
        return new_micro, new_k


@dataclass
class BatchState:
    """What a checkpoint holds of the adaptive batch (``to_payload`` / ``from_payload``)."""

    micro_batch: int
    batches_per_allreduce: int
    world_size: int
    start_batch: int
    samples_seen: int = 0
    epoch_samples: int = 0  # samples of the current epoch used (all ranks)
    tests: int = 0  # tests taken
    lr_factor: float = 1.0
    last: dict = field(default_factory=dict)  # the last test's moments and b_new
    smoother: dict = field(default_factory=dict)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch * self.world_size * self.batches_per_allreduce

    def to_payload(self) -> dict:
        return {"version": 1, **asdict(self)}

    @classmethod
    def from_payload(cls, payload: dict) -> BatchState:
        if payload.get("version") != 1:
            raise ValueError(f"unknown adaptive-batch state version {payload.get('version')!r}")
        fields = {k: v for k, v in payload.items() if k != "version"}
        return cls(**fields)


class BatchController:
    """The method between two steps: is a test due, what it decides, the LR factor.

    ``observe(moments)`` smooths the moments (optional EMA), computes b_new, grows the state's
    geometry and returns True when it changed (the caller then re-plans: new k for the
    distributed optimizer, new micro-batch for the sampler)."""

    def __init__(self, state: BatchState, growth: BatchGrowth, test_type: str, interval: int = 1,
                 eta=0.1, theta=0.1, nu=0.1, lr_policy="none", ema_beta=0.0) -> None:  # fmt: skip
        check_test_settings(test_type, eta, theta, nu)
        growth.check(state.micro_batch, state.batches_per_allreduce)
        if interval < 1:
            raise ValueError(f"--test-interval must be >= 1, got {interval}")
        lr_factor(lr_policy, 1, 1)  # validates the name
        self.state, self.growth, self.test_type = state, growth, test_type
        self.interval, self.tolerances, self.lr_policy = interval, (eta, theta, nu), lr_policy
        self.smoother = Smoother(ema_beta)
        if state.smoother:
            self.smoother.load_state_dict(state.smoother)

    def test_due(self, step: int) -> bool:
        """Test on steps 0, interval, 2 interval, ... while the batch is below its max."""
        full = self.state.global_batch_size >= self.growth.max_batch
        return self.test_type != "none" and step % self.interval == 0 and not full

    def observe(self, moments: Moments) -> bool:
        s = self.state
        smoothed = self.smoother.update(moments)
        wanted = b_new(smoothed, self.test_type, *self.tolerances)
        before = (s.micro_batch, s.batches_per_allreduce)
        target = next_batch_size(s.global_batch_size, wanted, self.growth.max_batch)
        s.micro_batch, s.batches_per_allreduce = self.growth.geometry_for(*before, target)
        s.tests += 1
        s.last = {**smoothed.to_dict(), "b_new": wanted, "target": target}
        s.smoother = self.smoother.state_dict()
        s.lr_factor = lr_factor(
            self.lr_policy, s.global_batch_size, s.start_batch, smoothed.b_simple
        )
        return (s.micro_batch, s.batches_per_allreduce) != before

    def after_step(self) -> None:
        self.state.samples_seen += self.state.global_batch_size

    def scalars(self) -> dict[str, float]:
        """TensorBoard values (log them against the step and against samples seen)."""
        s, last = self.state, self.state.last
        out = {
            "batch/size": s.global_batch_size,
            "batch/micro": s.micro_batch,
            "batch/accumulation": s.batches_per_allreduce,
            "batch/lr_factor": s.lr_factor,
        }
        names = ("var_norm", "var_inner_product", "var_orth", "grad_norm_sq", "b_new")
        out.update({f"batch_test/{n}": last[n] for n in names if n in last})
        return out
