"""`--task barlowtwins` through the training script: the recipe's defaults, bad input, a run on
the sample set (ssl/* and linear/* scalars, the probe above chance, --probe-only), exact resume
in either stage, and mpirun -np 2 with both backends. The parts themselves are tested in
tests/test_barlowtwins.py."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ROOT, check_ok, require_distributed, run_script
from test_fault_tolerance import _assert_bitwise_equal

from lars.checkpoint import list_checkpoints, load_checkpoint
from lars.cli import main
from lars.config import parse_args
from lars.faults import REQUEUE_EXIT_STATUS

SIGNAL_SCRIPT = ROOT / "tests" / "helpers" / "signal_at.py"
NAN_SCRIPT = ROOT / "tests" / "helpers" / "inject_nan.py"
# 1,438 training digits at batch 128: 11 pre-training steps; probe batch 64: 23 per epoch.
TINY = [
    "--task",
    "barlowtwins",
    "--model",
    "tinycnn",
    "--projector",
    "64-64",
    "--epochs",
    "1",
    "--workers",
    "0",
    "--threads",
    "1",
    "--log-interval",
    "4",
]


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def _last_checkpoint(log_dir) -> dict:
    return load_checkpoint(list_checkpoints(log_dir)[0])


def test_the_recipe_is_the_default_of_the_mode_and_classification_is_unchanged():
    common = ["--dataset", "imagenet", "--dry-run", "--batch-size", "64", "--ranks", "32"]
    bt = vars(parse_args([*common, "--task", "barlowtwins", "--epochs", "1000"]))
    peak = 0.2 * 64 * 32 / 256  # lr x global batch / 256 (Zbontar et al. 2021, section 4)
    assert (bt["base_op"], bt["optimizer_variant"], bt["lr_scaling"]) == (
        "lars",
        "barlowtwins",
        "linear",
    )
    assert (bt["base_lr"], bt["norm_bias_lr"], bt["wd"]) == (0.2, 0.0048, 1.5e-6)
    assert (bt["schedule"], bt["warmup_epochs"], bt["bn_bias_separately"]) == ("cosine", 10, True)
    assert bt["end_lr"] == pytest.approx(0.001 * peak)
    assert (bt["projector"], bt["bt_lambda"], bt["label_smoothing"]) == (
        "8192-8192-8192",
        0.0051,
        0,
    )
    assert (bt["probe_epochs"], bt["probe_lr"], bt["probe_wd"]) == (100, 0.3, 1e-6)
    compat = vars(parse_args([*common, "--task", "barlowtwins", "--bt-compat", "tvlars"]))
    assert compat["probe_wd"] == 5e-4
    tv = vars(parse_args([*common, "--task", "barlowtwins", "--base-op", "tvlars"]))
    assert (tv["lr_scaling"], tv["wd"], tv["end_lr"], tv["norm_bias_lr"]) == ("keep", 5e-5, 0, None)
    explicit = vars(
        parse_args([*common, "--task", "barlowtwins", "--wd", "0.01", "--epochs", "20"])
    )
    assert (explicit["wd"], explicit["warmup_epochs"]) == (0.01, 2.0)
    plain = vars(parse_args(common))
    assert (plain["lr_scaling"], plain["wd"], plain["end_lr"], plain["task"]) == (
        "keep",
        5e-5,
        0.0,
        "classification",
    )
    assert plain["projector"] is None and plain["label_smoothing"] == 0.1


def test_dry_run_describes_the_mode_with_both_rates(capsys):
    assert main(["--task", "barlowtwins", "--dataset", "imagenet", "--dry-run", "--ranks", "32",
                 "--batch-size", "64", "--model", "resnet50"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "2048-d features -> projector 8192-8192-8192, lambda 0.0051" in out
    assert "weights 1.6, biases and norms 0.0384" in out  # 0.2 and 0.0048 x 2048 / 256
    assert "linear probe       100 epochs" in out


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--projector", "512-x"], "--projector"),
        (["--projector", "512-0"], "--projector"),
        (["--label-smoothing", "0.1"], "--label-smoothing"),
        (["--batches-per-allreduce", "2"], "--batches-per-allreduce"),
        (["--use-adasum"], "--use-adasum"),
        (["--data-backend", "dali-cpu"], "--data-backend"),
        (["--synthetic"], "--data-backend"),
        (["--evaluate"], "--evaluate"),
        (["--probe-only", "no/such.pt"], "--probe-only"),
        (["--knn-k", "0"], "--knn-k"),
        (["--norm-bias-lr", "0.1", "--no-bn-bias-separately"], "--norm-bias-lr"),
        (["--model", "squeezenet1_0"], "--model"),
    ],
)
def test_bad_input_exits_2_naming_the_flag(flags, named, capsys, tmp_path):
    status = main(["--task", "barlowtwins", "--dry-run", "--log-dir", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert status == 2 and named in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_task_flags_without_the_task_are_refused(capsys):
    assert main(["--dry-run", "--projector", "64-64"]) == 2
    assert "--projector goes with --task barlowtwins" in capsys.readouterr().err


def test_nan_steps_are_skipped_and_never_reach_a_checkpoint(tmp_path):
    """The classification mode's rule: a NaN loss gives NaN gradients, the step is skipped."""
    log_dir = tmp_path / "run"
    out = check_ok(
        run_script(
            [*TINY, "--max-steps", "5", "--log-dir", log_dir],
            script=NAN_SCRIPT,
            env={"NAN_AT_CALLS": "2,3"},
        )
    )
    assert "2 non-finite step(s) skipped" in out
    payload = _last_checkpoint(log_dir)
    assert payload["nonfinite_steps"] == 2 and payload["global_step"] == 5
    assert all(torch.isfinite(t).all() for t in payload["model"].values())


@pytest.mark.slow
def test_pretraining_then_probe_on_the_sample_set_and_probe_only(tmp_path, capsys):
    """11 steps of pre-training (tinycnn, projector 64-64), the k-NN monitor, a 4-epoch probe;
    then --probe-only on the saved backbone. Chance is 10% (10 digits); measured: probe top-1
    92.2%, top-5 99.7%, k-NN 98.3% (random tinycnn features already separate these digits)."""
    log_dir = tmp_path / "run"
    out = check_ok(run_script([*TINY, "--probe-epochs", "4", "--log-dir", log_dir]))
    scalars = _scalars(log_dir)
    for tag in ("ssl/loss", "ssl/on_diag", "ssl/off_diag", "ssl/knn_top1", "train/lr"):
        assert tag in scalars, sorted(scalars)
    assert any(tag.startswith("trust_ratio/") for tag in scalars)
    assert "train/loss" not in scalars and "val/top1" not in scalars
    loss = [value for _, value in scalars["ssl/loss"]]
    assert all(math.isfinite(v) for v in loss) and loss[-1] < loss[0]
    assert [step for step, _ in scalars["linear/train_loss"]] == [12, 13, 14, 15]
    (step, top1), (_, top5) = scalars["linear/top1"][0], scalars["linear/top5"][0]
    assert step == 15 and top5 >= top1 > 60.0, out  # chance: 10%
    assert scalars["ssl/knn_top1"][0][1] > 50.0
    assert "done: linear probe top1" in out
    with capsys.disabled():
        knn = scalars["ssl/knn_top1"][0][1]
        print(f"\nBT sample set, CLI: probe top-1 {top1:.1f}% top-5 {top5:.1f}%, k-NN {knn:.1f}%")
    payload = _last_checkpoint(log_dir)
    assert (payload["stage"], payload["probe_epoch"], payload["global_step"]) == ("probe", 4, 11)

    again = check_ok(run_script([*TINY, "--probe-epochs", "4", "--log-dir", log_dir]))
    assert f"top1 {top1:.2f}%" in again and "probe epoch" not in again  # nothing left to train

    only = tmp_path / "only"
    checkpoint = list_checkpoints(log_dir)[-1]
    out = check_ok(
        run_script([*TINY, "--probe-epochs", "1", "--probe-only", checkpoint, "--log-dir", only])
    )
    assert "pre-training done" not in out and "probe epoch 1/1" in out
    payload = _last_checkpoint(only)
    assert payload["stage"] == "probe" and payload["global_step"] == 0


@pytest.mark.slow
def test_interrupted_in_either_stage_and_resumed_equals_uninterrupted_bitwise(tmp_path):
    """Cut in pre-training (--max-steps 5, then the same command without it) and in the probe
    (SIGTERM at its 30th batch: epoch 2, batch 7; exit status 3, then the same command): the
    final model, optimizer, schedule and probe tensors equal an uninterrupted run's."""
    common = [*TINY, "--deterministic", "--probe-epochs", "2"]
    check_ok(run_script([*common, "--log-dir", tmp_path / "whole"]))
    cut = tmp_path / "cut"
    out = check_ok(run_script([*common, "--max-steps", "5", "--log-dir", cut]))
    assert "the linear probe runs once pre-training is complete" in out
    assert _last_checkpoint(cut)["global_step"] == 5
    stopped = run_script(
        [*common, "--log-dir", cut], script=SIGNAL_SCRIPT, env={"SIGTERM_AT_SGD_STEP": "30"}
    )
    assert stopped.returncode == REQUEUE_EXIT_STATUS, stopped.stdout + stopped.stderr
    assert "resumed at step 5" in stopped.stdout
    payload = _last_checkpoint(cut)
    assert (payload["stage"], payload["probe_epoch"]) == ("probe", 1)
    assert 7 <= payload["probe_batches"] <= 8  # the stop lands one batch after the signal
    out = check_ok(run_script([*common, "--log-dir", cut]))
    assert "linear probe resumed at epoch 2" in out
    whole, resumed = _last_checkpoint(tmp_path / "whole"), _last_checkpoint(cut)
    for key in ("model", "optimizer", "scheduler", "probe", "probe_epoch", "global_step"):
        _assert_bitwise_equal(whole[key], resumed[key], key)


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_two_ranks_run_the_mode(tmp_path, backend):
    """Global batch 128 = 64 x 2 ranks: 11 steps, then a 1-epoch probe, on both backends."""
    require_distributed()
    args = [*TINY, "--batch-size", "64", "--probe-epochs", "1", "--backend", backend]
    out = check_ok(run_script([*args, "--log-dir", tmp_path / "run"], np=2))
    assert "2 rank(s)" in out and out.count("done: linear probe") == 1  # rank 0 alone prints
    assert "k-NN top-1" in out
    scalars = _scalars(tmp_path / "run")
    assert "ssl/loss" in scalars and "linear/top1" in scalars
