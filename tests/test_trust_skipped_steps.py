"""One rule for a skipped (non-finite) step: it counts as a step taken without an update.

The LR schedule, the optimizer's step count t (TVLARS's phi, LAMB's bias correction) and the
logged step all advance by one; weights and optimizer moments stay. Before: the schedule and
the logged step advanced, t did not, so phi and the bias correction drifted by the skips.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ROOT, check_ok, run_script
from test_run_identity import TINY, _newest, _scalars

NAN_SCRIPT = ROOT / "tests" / "helpers" / "inject_nan.py"


@pytest.mark.parametrize("optimizer", ["tvlars", "lamb"])
def test_a_skipped_step_advances_schedule_t_and_logged_step_together(tmp_path, optimizer):
    log_dir = tmp_path / "run"
    hyper = {
        "tvlars": ["--lmbda", "0.05", "--tv-delay-epochs", "0"],
        "lamb": ["--base-lr", "0.01"],
    }[optimizer]
    argv = [*TINY, "--base-op", optimizer, *hyper, "--max-steps", "6", "--log-interval", "1"]
    out = check_ok(
        run_script([*argv, "--log-dir", log_dir], script=NAN_SCRIPT, env={"NAN_AT_CALLS": "3"})
    )
    assert "1 non-finite step(s) skipped" in out
    state = _newest(log_dir)
    assert state["global_step"] == 6
    assert state["scheduler"]["last_epoch"] == 6
    steps = {float(s["step"]) for s in state["optimizer"]["state"].values() if "step" in s}
    assert steps == {6.0}, steps
    assert sorted(_scalars(log_dir, "train/lr")) == [1, 2, 3, 4, 5, 6]
    if optimizer == "tvlars":
        phi = _scalars(log_dir, "tvlars/phi")
        assert phi[6] == pytest.approx(1.0 / (1.0 + math.exp(0.05 * 6)), rel=1e-5)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
