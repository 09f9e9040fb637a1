"""--max-samples: a budget in training samples, the one that holds while the batch grows."""

from __future__ import annotations

from conftest import check_ok, run_script
from test_adaptive_train import GROWING, TINY, _growth
from test_fault_tolerance import _state

from lars.checkpoint import list_checkpoints


def test_a_fixed_batch_stops_at_the_step_that_reaches_the_budget(tmp_path):
    log_dir = tmp_path / "fixed"
    flags = [*TINY, "--batch-size", "16", "--epochs", "1", "--max-samples", "40"]
    check_ok(run_script([*flags, "--log-dir", log_dir]))
    assert list_checkpoints(log_dir)[0].name == "checkpoint-000000003.pt"  # 48 >= 40
    again = check_ok(run_script([*flags, "--log-dir", log_dir]))  # done: nothing runs again
    assert "nothing to do" in again


def test_a_growing_batch_stops_once_its_samples_reach_the_budget(tmp_path):
    budget = 200
    flags = [*GROWING, "--epochs", "1", "--max-samples", str(budget)]
    out = check_ok(run_script([*flags, "--log-dir", tmp_path / "grow"]))
    assert _growth(out), out  # the batch did grow on the way
    state = _state(tmp_path / "grow")
    seen = state["adaptive_batch"]["state"]["samples_seen"]
    assert budget <= seen < budget + 64  # the last step (at most the 64 cap) crossed it
    whole = _state_step(tmp_path, [*GROWING, "--epochs", "1"])
    assert state["global_step"] < whole  # without the budget the epoch goes on


def _state_step(tmp_path, flags) -> int:
    check_ok(run_script([*flags, "--log-dir", tmp_path / "whole"]))
    return _state(tmp_path / "whole")["global_step"]


def test_a_budget_of_no_samples_is_refused():
    result = run_script([*TINY, "--max-samples", "0", "--dry-run"])
    assert result.returncode == 2 and "--max-samples" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
