"""The training layer's pieces, in-process: settings, the run plan, the train state."""

from __future__ import annotations

import dataclasses

import pytest

from lars.config import get_args_parser, parse_settings
from lars.errors import ResumeError, SettingError
from lars.plan import plan_run
from lars.state import TrainState


def test_settings_are_frozen_and_hold_every_flag_once():
    settings = parse_settings(["--batches-per-allreduce", "2"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.batch.batches_per_allreduce = 4
    flat = settings.flat()
    dests = {a.dest for a in get_args_parser()._actions if a.dest != "help"}
    assert set(flat) == dests
    assert type(settings).from_flat(flat) == settings


def test_each_optimizer_record_decides_its_defaults():
    lars, tvlars, lamb = (parse_settings(["--base-op", n]) for n in ("lars", "tvlars", "lamb"))
    assert (lars.optimizer.base_lr, lars.schedule.schedule, lars.schedule.lr_power) == (
        2.0,
        "poly",
        2.0,
    )
    assert (tvlars.schedule.schedule, tvlars.schedule.warmup_epochs) == ("none", 0.0)
    assert (lamb.optimizer.base_lr, lamb.schedule.lr_power) == (0.01, 1.0)
    assert lars.schedule.warmup_epochs == 0.5  # the sample set's, as no record overrides it


def test_a_bad_value_is_rejected_once_naming_the_flag():
    with pytest.raises(SettingError, match=r"^--momentum must lie in \[0, 1\), got 1.5$"):
        parse_settings(["--momentum", "1.5"])


def test_plan_counts_follow_from_the_geometry():
    """1438 images on 3 ranks: ceil(1438 / 3) = 480 per rank, 480 // 8 = 60 micro-batches,
    60 // 7 = 8 steps per epoch (4 micro-batches dropped), global batch 8 x 3 x 7 = 168."""
    settings = parse_settings(
        ["--batch-size", "8", "--batches-per-allreduce", "7", "--epochs", "3"]
        + ["--warmup-epochs", "0.5", "--lr-scaling", "linear", "--base-lr", "1"]
    )
    plan = plan_run(settings, 3, 1438, 359)
    assert plan.global_batch_size == 168 and plan.samples_per_rank_per_step == 56
    assert (plan.micro_batches_per_epoch, plan.steps_per_epoch, plan.total_steps) == (60, 8, 24)
    assert plan.warmup_steps == 4 and plan.lr == pytest.approx(168 / 256)
    grown = plan.replan(settings, micro_batch=16, batches_per_allreduce=7)
    assert grown.global_batch_size == 336 and grown.steps_per_epoch == 30 // 7
    assert grown.lr == pytest.approx(336 / 256) and plan.global_batch_size == 168


def test_a_batch_larger_than_the_data_is_a_setting_error():
    settings = parse_settings(["--batch-size", "512", "--batches-per-allreduce", "2"])
    with pytest.raises(SettingError, match="--batches-per-allreduce"):
        plan_run(settings, 2, 1438, 359)


def test_train_state_round_trips_and_reads_old_checkpoints():
    plan = plan_run(parse_settings(["--batch-size", "16"]), 2, 1438, 359)  # 44 steps/epoch
    state = TrainState(epoch=1, step=50, nonfinite_total=2, last_validation={"top1": 90.0})
    payload = state.to_payload(plan)
    assert payload["step_in_epoch"] == 6 and payload["global_step"] == 50
    assert TrainState.from_payload(payload, plan) == state
    old = {k: v for k, v in payload.items() if k != "last_validation"}
    old["final"] = {"top1": 80.0}  # the key before it was renamed
    assert TrainState.from_payload(old, plan).last_validation == {"top1": 80.0}
    other = plan.replan(parse_settings([]), micro_batch=8, batches_per_allreduce=1)
    with pytest.raises(ResumeError, match="global batch 32"):
        TrainState.from_payload(payload, other)


def test_the_last_validation_is_described_in_words():
    from lars.reporting import describe_validation

    last = {"epoch": 4, "step": 88, "loss": 0.1211, "top1": 97.2145, "top5": 100.0}
    assert describe_validation(last) == (
        "last validation (epoch 4): top1 97.21% top5 100.00% loss 0.1211"
    )
    assert describe_validation(None) == "no validation yet"
