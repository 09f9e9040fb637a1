"""LR scaling and schedules against values computed by hand from the formulas in DESIGN.md."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from lars.schedules import (
    SCHEDULES,
    build_scheduler,
    epochs_to_steps,
    lr_at,
    scale_lr,
)

# A poly run: 10 warm-up steps, 110 in all, base 2.0, end 0.1.
POLY = dict(schedule="poly", base_lr=2.0, total_steps=110, warmup_steps=10, end_lr=0.1)


# ---------------------------------------------------------------- scale_lr


def test_scale_lr_keep_linear_sqrt():
    assert scale_lr(0.1, 8192, 256, "keep") == 0.1
    assert scale_lr(0.1, 8192, 256, "linear") == pytest.approx(3.2)  # 0.1 * 32
    assert scale_lr(0.5, 1024, 256, "sqrt") == pytest.approx(1.0)  # 0.5 * sqrt(4)
    assert scale_lr(0.1, 8192, rule="sqrt") == pytest.approx(0.565685424949238)  # 0.1 * sqrt(32)
    assert scale_lr(0.1, 8192) == 0.1  # keep is the default rule, 256 the default reference


def test_scale_lr_sqrt_scales_the_ratio_not_the_rate():
    # The seed's trainer computes sqrt(base_lr * k): for 0.5 and k = 4 that is 1.414..., not 1.0.
    assert scale_lr(0.5, 1024, 256, "sqrt") != pytest.approx(math.sqrt(0.5 * 4))
    assert scale_lr(2.0, 256, 256, "sqrt") == 2.0  # B = B0 leaves any rate unchanged


@pytest.mark.parametrize(
    "args, name",
    [
        ((0.1, 1024, 256, "cubic"), "rule"),
        ((0.0, 1024, 256, "linear"), "base_lr"),
        ((-0.1, 1024, 256, "linear"), "base_lr"),
        ((0.1, 0, 256, "linear"), "global_batch"),
        ((0.1, 1024, 0, "linear"), "reference_batch"),
        ((0.1, 1024, -256, "keep"), "reference_batch"),
    ],
)
def test_scale_lr_rejects_bad_input(args, name):
    with pytest.raises(ValueError, match=name):
        scale_lr(*args)


# ---------------------------------------------------------------- epochs_to_steps


@pytest.mark.parametrize(
    "epochs, steps_per_epoch, steps",
    [(0, 10, 0), (5, 100, 500), (0.5, 10, 5), (2.5, 3, 8), (1 / 3, 10, 3), (0.15, 10, 2)],
)
def test_epochs_to_steps_rounds_to_nearest_half_up(epochs, steps_per_epoch, steps):
    assert epochs_to_steps(epochs, steps_per_epoch) == steps


def test_epochs_to_steps_rejects_bad_input():
    with pytest.raises(ValueError, match="epochs"):
        epochs_to_steps(-1, 10)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        epochs_to_steps(1, 0)


def test_fractional_warmup_epochs():
    warmup = epochs_to_steps(0.5, 10)  # 5 steps
    args = dict(schedule="constant", base_lr=1.0, total_steps=100, warmup_steps=warmup)
    assert lr_at(3, **args) == pytest.approx(0.6)
    assert lr_at(5, **args) == 1.0


# ---------------------------------------------------------------- lr_at, formulas


def test_poly_power_2_by_hand():
    assert lr_at(0, **POLY) == 0.0  # warm-up from 0: the first update has rate 0, as in the seed
    assert lr_at(5, **POLY) == pytest.approx(1.0)  # half-way through the warm-up
    assert lr_at(10, **POLY) == pytest.approx(2.0)  # end of warm-up: the base rate
    assert lr_at(60, **POLY) == pytest.approx(0.1 + 1.9 * 0.5**2)  # middle of the decay
    assert lr_at(109, **POLY) == pytest.approx(0.1 + 1.9 * 0.01**2)  # last step
    assert lr_at(110, **POLY) == pytest.approx(0.1)  # after the last step: end_lr
    assert lr_at(10_000, **POLY) == pytest.approx(0.1)


def test_poly_power_1_by_hand():
    args = dict(POLY, power=1.0)
    assert lr_at(60, **args) == pytest.approx(0.1 + 1.9 * 0.5)
    assert lr_at(35, **args) == pytest.approx(0.1 + 1.9 * 0.75)
    assert lr_at(109, **args) == pytest.approx(0.1 + 1.9 * 0.01)


def test_poly_decay_counts_from_end_of_warmup():
    # The seed's PolynomialDecay restarts its counter at the end of warm-up over T - W steps.
    assert lr_at(11, **POLY) == pytest.approx(0.1 + 1.9 * (1 - 1 / 100) ** 2)
    assert lr_at(11, **POLY) != pytest.approx(0.1 + 1.9 * (1 - 11 / 110) ** 2)


def test_cosine_by_hand():
    args = dict(schedule="cosine", base_lr=1.0, total_steps=110, warmup_steps=10, end_lr=0.0)
    assert lr_at(0, **args) == 0.0
    assert lr_at(4, **args) == pytest.approx(0.4)
    assert lr_at(10, **args) == pytest.approx(1.0)
    assert lr_at(35, **args) == pytest.approx(0.8535533905932737)  # (1 + cos(pi / 4)) / 2
    assert lr_at(60, **args) == pytest.approx(0.5)
    assert lr_at(110, **args) == 0.0
    with_end = dict(args, end_lr=0.2)
    assert lr_at(60, **with_end) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_at(500, **with_end) == pytest.approx(0.2)


def test_step_by_hand():
    args = dict(
        schedule="step", base_lr=1.0, total_steps=90, warmup_steps=5, milestones=(30, 60, 80)
    )
    expected = {0: 0.0, 2: 0.4, 5: 1.0, 29: 1.0, 30: 0.1, 59: 0.1, 60: 0.01, 80: 0.001, 200: 0.001}
    for step, lr in expected.items():
        assert lr_at(step, **args) == pytest.approx(lr), step


def test_step_milestones_from_epochs():
    milestones = [epochs_to_steps(e, 7) for e in (30, 60, 80)]
    args = dict(
        schedule="step", base_lr=0.8, total_steps=630, warmup_steps=0, milestones=milestones
    )
    assert lr_at(209, **args) == pytest.approx(0.8)
    assert lr_at(210, **args) == pytest.approx(0.08)  # epoch 30 of 7 steps each


def test_constant_and_none():
    args = dict(schedule="constant", base_lr=0.5, total_steps=100, warmup_steps=4)
    assert [lr_at(s, **args) for s in (0, 1, 4, 99, 100, 1000)] == pytest.approx(
        [0.0, 0.125, 0.5, 0.5, 0.5, 0.5]
    )
    assert lr_at(0, schedule="constant", base_lr=0.5, total_steps=10, warmup_steps=0) == 0.5
    none = dict(schedule="none", base_lr=0.3, total_steps=100, warmup_steps=0)
    assert [lr_at(s, **none) for s in (0, 50, 100, 1000)] == [0.3, 0.3, 0.3, 0.3]


def test_warmup_equal_to_total_steps():
    args = dict(schedule="poly", base_lr=1.0, total_steps=10, warmup_steps=10, end_lr=0.0)
    assert lr_at(5, **args) == pytest.approx(0.5)
    assert lr_at(10, **args) == 0.0


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(warmup_steps=111), "warmup_steps"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(total_steps=0), "total_steps"),
        (dict(base_lr=-1.0), "base_lr"),
        (dict(end_lr=-0.1), "end_lr"),
        (dict(power=0.0), "power"),
        (dict(power=-1.0), "power"),
        (dict(schedule="linear"), "schedule"),
        (dict(schedule="step"), "milestones"),
        (dict(schedule="step", milestones=(30, 30)), "milestones"),
        (dict(schedule="step", milestones=(-1, 30)), "milestones"),
        (dict(schedule="none"), "warmup_steps"),
    ],
)
def test_lr_at_rejects_bad_input(change, name):
    with pytest.raises(ValueError, match=name):
        lr_at(1, **dict(POLY, **change))


def test_lr_at_rejects_negative_step():
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, **POLY)


# ---------------------------------------------------------------- the scheduler object


def _optimizer(lrs=(0.4, 0.1)):
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in lrs]
    return torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)], lr=0.4)


def _run(optimizer, scheduler, steps):
    """Rates used by each of `steps` optimizer steps (read before the step, as SGD does)."""
    used = []
    for _ in range(steps):
        used.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return used


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_scheduler_matches_lr_at_over_a_run(schedule):
    warmup = 0 if schedule == "none" else 6
    kwargs = dict(total_steps=40, warmup_steps=warmup, end_lr=0.04, power=2.0)
    if schedule == "step":
        kwargs["milestones"] = (15, 30)
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, schedule=schedule, **kwargs)
    used = _run(optimizer, scheduler, 45)
    for step, (lr0, lr1) in enumerate(used):
        assert lr0 == lr_at(step, schedule=schedule, base_lr=0.4, **kwargs), step
        # group 1 starts at a quarter of group 0's rate; its end rate is scaled likewise
        group1 = dict(kwargs, end_lr=0.01)
        assert lr1 == pytest.approx(lr_at(step, schedule=schedule, base_lr=0.1, **group1)), step


def test_first_update_uses_rate_zero_during_warmup():
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_scheduler(optimizer, schedule="poly", total_steps=10, warmup_steps=4)
    for expected in (1.0, 0.75, 0.25):  # rates 0, 1/4, 2/4 times a gradient of 1
        param.grad = torch.ones(2)
        optimizer.step()
        scheduler.step()
        assert param.detach().tolist() == pytest.approx([expected, expected])


def test_scheduler_state_dict_round_trip():
    kwargs = dict(schedule="poly", total_steps=30, warmup_steps=5, end_lr=0.01, power=2.0)
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, **kwargs)
    _run(optimizer, scheduler, 12)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)  # the default, weights_only=True, must accept it

    resumed_optimizer = _optimizer()
    # A scheduler built with different settings takes the saved ones on load.
    resumed = build_scheduler(resumed_optimizer, schedule="constant", total_steps=5, warmup_steps=0)
    resumed.load_state_dict(saved)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler stepped before optimizer" warning
        rest = _run(resumed_optimizer, resumed, 25)
    original = _run(optimizer, scheduler, 25)
    assert rest == original
    assert [lr for lr, _ in rest] == [lr_at(s, base_lr=0.4, **kwargs) for s in range(12, 37)]


def test_build_scheduler_validates():
    with pytest.raises(ValueError, match="warmup_steps"):
        build_scheduler(_optimizer(), schedule="poly", total_steps=10, warmup_steps=11)
    with pytest.raises(ValueError, match="schedule"):
        build_scheduler(_optimizer(), schedule="exp", total_steps=10, warmup_steps=0)
