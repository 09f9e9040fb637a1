"""LARS-ImageNet's PolynomialWarmup, re-implemented in float64 from its formula, against ours at
every step: the closed form, the scheduler driving an optimizer, and a real run's logged LR.

The formula (NUS-HPC-AI-Lab/LARS-ImageNet-PyTorch, utils.py, PolynomialWarmup): with W warm-up
steps, T total steps, D = T - W decay steps, k the optimizer steps taken so far,

    k < W:   lr = base * k / W
    k >= W:  lr = (base - end) * (1 - min(j, D) / D) ** power + end,   j = k - W
"""

from __future__ import annotations

import pytest
import torch
from conftest import check_ok, run_script

from lars.schedules import build_scheduler, lr_at

TINY = ["--model", "tinycnn", "--workers", "0", "--threads", "1", "--epochs", "1"]


def _scalars(log_dir, tag) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def polynomial_warmup(k: int, base: float, total: int, warmup: int, end: float, power: float):
    if k < warmup:
        return base * k / warmup
    decay = total - warmup
    if decay == 0:
        return end
    j = k - warmup
    return (base - end) * (1.0 - min(j, decay) / decay) ** power + end


SETTINGS = [
    # base, total, warmup, end, power
    (2.0, 100, 10, 0.0, 2.0),
    (5.656854, 57, 0, 0.0, 1.0),
    (0.1, 40, 13, 0.001, 2.0),  # a fractional warm-up: 0.3125 epochs x 41 steps -> 13
    (3.0, 12, 12, 0.0, 2.0),  # warm-up as long as the run
]


@pytest.mark.parametrize("base, total, warmup, end, power", SETTINGS)
def test_closed_form_and_scheduler_equal_polynomial_warmup_at_every_step(
    base, total, warmup, end, power
):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base)
    scheduler = build_scheduler(
        optimizer, schedule="poly", total_steps=total, warmup_steps=warmup, end_lr=end, power=power
    )
    for k in range(total + 3):  # past the end too: the end rate holds
        expected = polynomial_warmup(k, base, total, warmup, end, power)
        got = lr_at(
            k,
            schedule="poly",
            base_lr=base,
            total_steps=total,
            warmup_steps=warmup,
            end_lr=end,
            power=power,
        )
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-15), k
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        optimizer.step()
        scheduler.step()


def test_a_real_run_logs_polynomial_warmup_with_a_fractional_warmup(tmp_path):
    """--warmup-epochs 0.3125 of 22 steps per epoch is 6.875 steps, rounded to 7; the LR logged
    after k steps is the rate of the (k+1)-th update."""
    log_dir = tmp_path / "run"
    argv = [*TINY, "--batch-size", "64", "--base-lr", "2", "--warmup-epochs", "0.3125"]
    check_ok(run_script([*argv, "--log-interval", "1", "--log-dir", log_dir]))
    total, warmup = 1438 // 64, 7
    logged = _scalars(log_dir, "train/lr")
    assert sorted(logged) == list(range(1, total + 1))
    for k, value in logged.items():
        expected = polynomial_warmup(k, 2.0, total, warmup, 0.0, 2.0)
        assert value == pytest.approx(expected, rel=1e-6, abs=1e-7), k
