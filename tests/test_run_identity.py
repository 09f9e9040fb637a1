"""A run is what its settings say: fingerprints, resume refusal, explicit mid-run changes.

Through the command line, as a user meets them: a re-run with new hyper-parameters must never
continue (or return) the old run silently, and a change the user asks for is applied for real
and recorded with the step at which it happened.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, SCRIPT

from lars.checkpoint import list_checkpoints, load_checkpoint

TINY = [
    "--model",
    "tinycnn",
    "--workers",
    "0",
    "--threads",
    "1",
    "--batch-size",
    "32",  # the sample set's 1,438 images: 44 steps per epoch on one rank
    "--epochs",
    "1",
    "--log-interval",
    "100",
]
STEPS_PER_EPOCH = 1438 // 32


def _run(args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)},
    )


def _ok(result) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _newest(log_dir) -> dict:
    return load_checkpoint(list_checkpoints(log_dir)[0])


def _scalars(log_dir, tag) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def _refusal_line(result) -> str:
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_sweep_points_get_their_own_default_log_dirs(tmp_path):
    """Two settings never share a default log dir; its name carries the short fingerprint."""
    for lr in ("2", "8"):
        _ok(_run([*TINY, "--base-lr", lr, "--max-steps", "2"], cwd=tmp_path))
    dirs = sorted((tmp_path / "runs").iterdir())
    assert len(dirs) == 2, dirs
    for folder in dirs:
        config = json.loads((folder / "config.json").read_text())
        assert folder.name.endswith("-" + config["fingerprint"][:8]), folder.name
        assert _newest(folder)["fingerprint"] == config["fingerprint"]
    # The same command again finds its own run.
    again = _ok(_run([*TINY, "--base-lr", "8", "--max-steps", "3"], cwd=tmp_path))
    assert "resumed at step 2" in again
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_a_finished_run_with_new_settings_is_refused_not_returned(tmp_path):
    """Before: exit 0, 'nothing to do' and the first run's metrics."""
    log_dir = tmp_path / "run"
    _ok(_run([*TINY, "--base-lr", "2", "--max-steps", "3", "--log-dir", log_dir]))
    before = list_checkpoints(log_dir)
    result = _run(
        [*TINY, "--base-lr", "8", "--wd", "0.5", "--max-steps", "3", "--log-dir", log_dir]
    )
    line = _refusal_line(result)
    assert "nothing to do" not in result.stdout
    assert "--base-lr 2 -> 8" in line and "--wd 5e-05 -> 0.5" in line, line
    assert "--allow-change" in line and "--resume none" in line, line
    assert list_checkpoints(log_dir) == before


def test_a_refusal_names_every_differing_setting(tmp_path):
    log_dir = tmp_path / "run"
    _ok(_run([*TINY, "--max-steps", "2", "--log-dir", log_dir]))
    changed = ["--seed", "7", "--momentum", "0.8", "--label-smoothing", "0.1", "--no-hflip"]
    line = _refusal_line(_run([*TINY, *changed, "--max-steps", "4", "--log-dir", log_dir]))
    for part in ("--seed 42 -> 7", "--momentum 0.9 -> 0.8", "--label-smoothing 0 -> 0.1"):
        assert part in line, line


def test_settings_that_do_not_shape_the_trajectory_may_change(tmp_path):
    log_dir = tmp_path / "run"
    _ok(_run([*TINY, "--max-steps", "2", "--log-dir", log_dir]))
    other = ["--max-steps", "4", "--log-interval", "1", "--keep-checkpoints", "5"]
    assert "resumed at step 2" in _ok(_run([*TINY, *other, "--log-dir", log_dir]))


def _poly(step, base, total, warmup, power=2.0):
    """LARS-ImageNet's PolynomialWarmup, written from its formula (end lr 0)."""
    if step < warmup:
        return base * step / warmup
    return base * (1 - min(step - warmup, total - warmup) / (total - warmup)) ** power


def test_a_longer_run_re_plans_the_schedule_and_records_the_change(tmp_path):
    """Before: the extra epoch ran at lr 0 (the old total_steps was kept)."""
    log_dir = tmp_path / "run"
    common = [*TINY, "--base-lr", "2", "--warmup-epochs", "0.5", "--log-dir", log_dir]
    _ok(_run(common))
    refused = _run([*common, "--epochs", "2"])
    assert "--epochs 1 -> 2" in _refusal_line(refused)
    out = _ok(_run([*common, "--epochs", "2", "--allow-change", "epochs", "--log-interval", "4"]))
    assert "epochs 1 -> 2 at step 44" in out, out
    total, warmup = 2 * STEPS_PER_EPOCH, STEPS_PER_EPOCH // 2
    assert _newest(log_dir)["global_step"] == total
    lr = _scalars(log_dir, "train/lr")
    for step in range(48, total + 1, 4):
        assert lr[step] == pytest.approx(_poly(step, 2.0, total, warmup), rel=1e-6), step
    assert lr[48] > 0.1
    config = json.loads((log_dir / "config.json").read_text())
    assert config["changes"] == [{"step": 44, "setting": "epochs", "old": 1, "new": 2}]
    assert config["args"]["epochs"] == 2
    # The same command again (a requeue) finds nothing left to change or do.
    again = _ok(_run([*common, "--epochs", "2", "--allow-change", "epochs"]))
    assert "nothing to do" in again
    assert json.loads((log_dir / "config.json").read_text())["changes"] == config["changes"]


def test_an_allowed_lr_and_wd_change_is_applied_not_only_recorded(tmp_path):
    """Before: the run trained at the old lr and wd while config.json recorded the new ones."""
    log_dir = tmp_path / "run"
    common = [*TINY, "--schedule", "constant", "--warmup-epochs", "0", "--log-dir", log_dir]
    _ok(_run([*common, "--base-lr", "2", "--max-steps", "3"]))
    new = ["--base-lr", "8", "--wd", "0.5", "--allow-change", "base-lr,wd", "--max-steps", "6"]
    _ok(_run([*common, *new, "--log-interval", "1"]))
    groups = _newest(log_dir)["optimizer"]["param_groups"]
    assert {g["lr"] for g in groups} == {8.0}
    assert max(g["weight_decay"] for g in groups) == 0.5
    assert _scalars(log_dir, "train/lr")[6] == pytest.approx(8.0)
    changes = json.loads((log_dir / "config.json").read_text())["changes"]
    assert changes == [
        {"step": 3, "setting": "base_lr", "old": 2.0, "new": 8.0},
        {"step": 3, "setting": "wd", "old": 5e-05, "new": 0.5},
    ]


@pytest.mark.parametrize(
    "allow, needle",
    [("model", "--allow-change model"), ("learning-rate", "--allow-change: unknown setting")],
)
def test_what_cannot_change_mid_run_is_refused(tmp_path, allow, needle):
    log_dir = tmp_path / "run"
    _ok(_run([*TINY, "--max-steps", "2", "--log-dir", log_dir]))
    extra = ["--model", "resnet18_small"] if allow == "model" else []
    line = _refusal_line(_run([*TINY, *extra, "--allow-change", allow, "--log-dir", log_dir]))
    assert needle in line, line
