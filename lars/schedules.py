"""Learning-rate scaling rules and schedules, as pure functions of the optimizer step.

Step `s` counts optimizer steps already taken: `s = 0` is the rate of the first update, and the
scheduler is stepped once after every optimizer step (never per micro-batch). With `W` warm-up
steps, `T` total steps, base rate `lr` and end rate `lr_end`:

    warm-up (every schedule but "none"), s < W:   lr * s / W
    poly,     W <= s < T:   lr_end + (lr - lr_end) * (1 - (s - W) / (T - W)) ** power
    cosine,   W <= s < T:   lr_end + (lr - lr_end) * (1 + cos(pi * (s - W) / (T - W))) / 2
    poly, cosine, s >= T:   lr_end
    step:      lr * min(1, s / W) * 0.1 ** (number of milestones <= s)
    constant:  lr * min(1, s / W)
    none:      lr                 (TVLARS: its factor phi(t) is the schedule; W must be 0)

"poly" is the seed's `PolynomialWarmup(optimizer, decay_steps=T, warmup_steps=W, end_lr, power)`
(NUS-HPC-AI-Lab/LARS-ImageNet-PyTorch, utils.py at commit 4a52868). That class returns
`s / W * lr` while `s < W`, then hands over to a `PolynomialDecay` built with `T - W` decay steps
whose own counter starts at 0 when `s = W`, so it computes exactly the formula above, including
`lr(0) = 0` (the first update is made with rate 0) and `lr_end` from `T` on. Where this module
differs: `W = T` is allowed (the seed divides by zero), and `lr_end` is scaled per group (below).
Polynomial decay with power 2 is the schedule of the LARS paper (You, Gitman, Ginsburg 2017,
arXiv:1708.03888); cosine is SGDR without restarts (Loshchilov & Hutter 2017, arXiv:1608.03983);
step 30/60/80 with linear warm-up is Goyal et al. 2017 (arXiv:1706.02677).

Warm-up given in (possibly fractional) epochs is converted by the caller with `epochs_to_steps`.
"""

from __future__ import annotations

import math
import operator
from bisect import bisect_right
from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "LR_SCALING_RULES",
    "SCHEDULES",
    "STEP_DECAY_EPOCHS",
    "STEP_DECAY_FACTOR",
    "ClosedFormLR",
    "build_scheduler",
    "epochs_to_steps",
    "lr_at",
    "scale_lr",
]

LR_SCALING_RULES = ("keep", "linear", "sqrt")
SCHEDULES = ("poly", "cosine", "step", "constant", "none")
STEP_DECAY_EPOCHS = (30, 60, 80)  # Goyal et al. 2017, the ResNet-50 ImageNet recipe
STEP_DECAY_FACTOR = 0.1


def _positive_number(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value}")
    return value


def _non_negative_number(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _integer(name: str, value: int, *, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def scale_lr(
    base_lr: float, global_batch: int, reference_batch: int = 256, rule: str = "keep"
) -> float:
    """Scale the rate tuned for `reference_batch` (B0) to the global batch B.

    keep:   base_lr
    linear: base_lr * B / B0             (Goyal et al. 2017, arXiv:1706.02677)
    sqrt:   base_lr * sqrt(B / B0)       (Krizhevsky 2014, arXiv:1404.5997; used for LAMB by
                                          You et al. 2020, arXiv:1904.00962)

    Only the batch ratio is square-rooted: the seed's trainer computes `sqrt(base_lr * k)`,
    which also takes the root of the rate itself.
    """
    base_lr = _positive_number("base_lr", base_lr)
    global_batch = _integer("global_batch", global_batch, minimum=1)
    reference_batch = _integer("reference_batch", reference_batch, minimum=1)
    ratio = global_batch / reference_batch
    if rule == "keep":
        return base_lr
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    raise ValueError(f"rule must be one of {', '.join(LR_SCALING_RULES)}; got {rule!r}")


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """`round(epochs * steps_per_epoch)`, halves rounded up (2.5 -> 3), as an int.

    Rounding to nearest keeps a fractional warm-up (e.g. 0.5 epochs) as close as possible to what
    was asked; halves go up rather than to even so the result does not depend on parity. The
    product is taken in decimal on the shortest repr of `epochs`, so 0.15 epochs of 10 steps is
    1.5 -> 2 steps (binary floating point would give 1.4999... -> 1).
    """
    epochs = _non_negative_number("epochs", epochs)
    steps_per_epoch = _integer("steps_per_epoch", steps_per_epoch, minimum=1)
    exact = Decimal(repr(epochs)) * steps_per_epoch
    return int(exact.to_integral_value(rounding=ROUND_HALF_UP))


def _check_schedule(
    schedule: str,
    total_steps: int,
    warmup_steps: int,
    end_lr: float,
    power: float,
    milestones: Sequence[int],
) -> tuple[int, int, float, float, tuple[int, ...]]:
    """Validate schedule arguments; return them normalised. ValueError names the argument."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    total_steps = _integer("total_steps", total_steps, minimum=1)
    warmup_steps = _integer("warmup_steps", warmup_steps, minimum=0)
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps})"
        )
    if schedule == "none" and warmup_steps:
        raise ValueError(
            f"warmup_steps must be 0 for schedule 'none' (TVLARS needs no warm-up), "
            f"got {warmup_steps}"
        )
    end_lr = _non_negative_number("end_lr", end_lr)
    power = _positive_number("power", power)
    checked: tuple[int, ...] = ()
    if schedule == "step":
        checked = tuple(_integer("milestones", m, minimum=0) for m in milestones)
        if not checked:
            raise ValueError("milestones must not be empty for schedule 'step'")
        if any(b <= a for a, b in zip(checked, checked[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {list(checked)}")
    return total_steps, warmup_steps, end_lr, power, checked


def _lr(
    step: int,
    schedule: str,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    end_lr: float,
    power: float,
    milestones: tuple[int, ...],
) -> float:
    """The formulas of the module docstring, on arguments already validated."""
    if schedule == "none":
        return base_lr
    if step < warmup_steps:
        warm = step / warmup_steps
        if schedule == "step":
            return base_lr * warm * STEP_DECAY_FACTOR ** bisect_right(milestones, step)
        return base_lr * warm
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        return base_lr * STEP_DECAY_FACTOR ** bisect_right(milestones, step)
    if step >= total_steps:
        return end_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    if schedule == "poly":
        return end_lr + (base_lr - end_lr) * (1.0 - progress) ** power
    return end_lr + (base_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def lr_at(
    step: int,
    *,
    schedule: str,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    end_lr: float = 0.0,
    power: float = 2.0,
    milestones: Sequence[int] = (),
) -> float:
    """Learning rate of the update made after `step` optimizer steps (formulas: module docstring).

    `power` is used by "poly" only, `end_lr` by "poly" and "cosine", `milestones` (in optimizer
    steps, e.g. `[epochs_to_steps(e, steps_per_epoch) for e in STEP_DECAY_EPOCHS]`) by "step".
    Raises ValueError naming the argument for a negative step or base_lr, an unknown schedule,
    warmup_steps > total_steps, power <= 0, or bad milestones.
    """
    step = _integer("step", step, minimum=0)
    base_lr = _non_negative_number("base_lr", base_lr)
    checked = _check_schedule(schedule, total_steps, warmup_steps, end_lr, power, milestones)
    return _lr(step, schedule, base_lr, *checked)


class ClosedFormLR(LRScheduler):
    """A `torch.optim.lr_scheduler` whose every value comes from `lr_at` (never from the last one).

    Group g gets `lr_at(last_epoch, base_lr=initial_lr_g, end_lr=end_lr_g, ...)`, so all groups
    follow the same shape and keep the ratios of their initial rates. `end_lr` is the end rate of
    group 0 (the decayed weights of `param_groups`); another group's end rate is scaled likewise,
    `end_lr_g = end_lr * initial_lr_g / initial_lr_0`, so the ratios hold at the end too.
    `state_dict()` holds the step and the schedule's settings; `load_state_dict` restores both.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        schedule: str,
        total_steps: int,
        warmup_steps: int,
        end_lr: float = 0.0,
        power: float = 2.0,
        milestones: Sequence[int] = (),
        last_epoch: int = -1,
    ) -> None:
        checked = _check_schedule(schedule, total_steps, warmup_steps, end_lr, power, milestones)
        self.schedule = schedule
        self.total_steps, self.warmup_steps, self.end_lr, self.power, self.milestones = checked
        initial = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        if any(lr < 0 or not math.isfinite(lr) for lr in initial):
            raise ValueError(f"optimizer learning rates must be finite and >= 0, got {initial}")
        if self.end_lr and initial and initial[0] <= 0 and any(lr != initial[0] for lr in initial):
            raise ValueError(
                "end_lr is relative to param group 0's lr, which is 0: set end_lr=0 or give "
                "group 0 a positive lr"
            )
        super().__init__(optimizer, last_epoch)

    def _group_end_lr(self, base_lr: float, reference_lr: float) -> float:
        if base_lr == reference_lr:
            return self.end_lr
        return self.end_lr * base_lr / reference_lr if self.end_lr else 0.0

    def _get_closed_form_lr(self) -> list[float]:
        base_lrs = [float(lr) for lr in self.base_lrs]
        step = max(self.last_epoch, 0)
        return [
            _lr(
                step,
                self.schedule,
                base_lr,
                self.total_steps,
                self.warmup_steps,
                self._group_end_lr(base_lr, base_lrs[0]),
                self.power,
                self.milestones,
            )
            for base_lr in base_lrs
        ]

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """Rates for `self.last_epoch` optimizer steps taken; a pure function of that count."""
        return self._get_closed_form_lr()


def build_scheduler(
    optimizer: Optimizer,
    *,
    schedule: str,
    total_steps: int,
    warmup_steps: int,
    end_lr: float = 0.0,
    power: float = 2.0,
    milestones: Sequence[int] = (),
) -> LRScheduler:
    """A `ClosedFormLR` for `optimizer`: step it once after every optimizer step.

    Creating it sets every group's lr to its step-0 value (0 during a warm-up). On resume,
    build it the same way, then `load_state_dict` the saved scheduler state.
    """
    return ClosedFormLR(
        optimizer,
        schedule=schedule,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        end_lr=end_lr,
        power=power,
        milestones=milestones,
    )
