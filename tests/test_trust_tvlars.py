"""TVLARS through the trainer: defaults that mean what they say, at any batch size and length.

phi(t) = 1 / (alpha + exp(lmbda (t - d_e))) + gamma_min (Do et al. 2023, arXiv:2309.14053,
eq. 4-5). Before: the trainer's defaults (alpha 1, d_e 0, lmbda 1e-3 per step) gave
phi(1) = 0.4998, and 0.0019 after 5 ImageNet epochs at global batch 1024.
"""

from __future__ import annotations

import math
import re

import pytest
from conftest import check_ok, run_script
from test_run_identity import TINY, _scalars

from lars.cli import main


def _phi(t, lmbda, alpha=1.0, delay=0.0, floor=0.0):
    """The paper's phi in float64, written out independently of lars.optim.tvlars."""
    x = lmbda * (t - delay)
    return (1.0 / (alpha + math.exp(x)) if x < 700 else 0.0) + floor


def _dry_run_phi(argv, capsys) -> dict[str, float]:
    assert main(["--dry-run", "--base-op", "tvlars", *argv]) == 0
    out = capsys.readouterr().out
    found = {}
    for name in ("first step", "end of the delay", "half-way", "last step"):
        match = re.search(rf"phi at (?:the )?{name}\b.*:\s+([0-9.e+-]+)\s*$", out, re.M)
        assert match, f"no 'phi at {name}' line in\n{out}"
        found[name] = float(match.group(1))
    return found


def test_the_trainer_defaults_start_at_plain_lars(tmp_path):
    log_dir = tmp_path / "run"
    argv = [*TINY, "--base-op", "tvlars", "--max-steps", "2", "--log-interval", "1"]
    check_ok(run_script([*argv, "--log-dir", log_dir]))
    phi = _scalars(log_dir, "tvlars/phi")
    assert phi[1] >= 0.99, phi


IMAGENET_1024 = ["--train-images", "1281167", "--batch-size", "128", "--ranks", "8"]


def test_imagenet_default_plan_holds_through_the_delay_then_decays(capsys):
    phi = _dry_run_phi(["--model", "resnet50", "--epochs", "90", *IMAGENET_1024], capsys)
    assert phi["first step"] >= 0.99 and phi["end of the delay"] >= 0.99
    assert 0.05 < phi["half-way"] < 0.95  # decaying, not stalled at the floor
    assert phi["last step"] <= 0.05


@pytest.mark.parametrize(
    "plan",
    [
        ["--batch-size", "16", "--epochs", "4"],
        ["--batch-size", "64", "--epochs", "4"],
        ["--batch-size", "32", "--epochs", "12"],
        ["--model", "resnet50", "--epochs", "90", *IMAGENET_1024],
    ],
)
def test_the_defaults_behave_the_same_at_any_batch_size_and_length(plan, capsys):
    phi = _dry_run_phi(plan, capsys)
    reference = _dry_run_phi(["--batch-size", "32", "--epochs", "4"], capsys)
    for point, value in phi.items():
        assert value == pytest.approx(reference[point], abs=0.02), point


def test_the_papers_exact_per_step_values_stay_available(capsys):
    # lmbda 1e-3 per step, alpha 1, d_e 0, gamma_min 0: the authors' defaults, unchanged.
    argv = ["--lmbda", "0.001", "--tv-alpha", "1", "--tv-delay-epochs", "0"]
    phi = _dry_run_phi([*argv, "--batch-size", "32", "--epochs", "4"], capsys)
    assert phi["first step"] == pytest.approx(_phi(1, 1e-3), rel=1e-4)  # 0.49975
    steps = 4 * (1438 // 32)
    assert phi["last step"] == pytest.approx(_phi(steps, 1e-3), rel=1e-4)
    alpha = _dry_run_phi(["--lmbda", "0.01", "--tv-alpha", "0.1"], capsys)
    assert alpha["first step"] == pytest.approx(_phi(1, 0.01, alpha=0.1), rel=1e-4)
