"""Validation scores the model that is saved, and `--evaluate` scores a checkpoint.

With BatchNorm, each rank's running statistics follow its own shard of the training data.
Before: they were broadcast once at the start and never again, so on 2 ranks each half of the
validation set was scored by a different model, and the checkpoint held rank 0's statistics
(measured: logged 37/359 top-1, the checkpoint scores 39/359 in one process).
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import check_ok, require_distributed, run_script

from lars.checkpoint import list_checkpoints

BN_RUN = [
    "--model",
    "resnet18_small",  # BatchNorm everywhere
    "--workers",
    "0",
    "--threads",
    "1",
    "--epochs",
    "1",
    "--batch-size",
    "16",
    "--val-batch-size",
    "64",
    "--max-steps",
    "6",
    "--log-interval",
    "3",
]
LAST_LINE = re.compile(r"^top1 ([0-9.]+)% top5 ([0-9.]+)% loss ([0-9.]+)$")


def _evaluation(result) -> dict[str, float]:
    out = check_ok(result)
    last = out.strip().splitlines()[-1]
    match = LAST_LINE.match(last)
    assert match, f"last line is {last!r}"
    return dict(zip(("top1", "top5", "loss"), map(float, match.groups())))


def _last(log_dir, tag) -> float:
    """The last value of a TensorBoard scalar: what the run reported."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return events.Scalars(tag)[-1].value


def _count(percent: float, total: int = 359) -> int:
    count = percent * total / 100
    assert count == pytest.approx(round(count), abs=0.05)  # printed to 2 decimals
    return round(count)


@pytest.mark.distributed
def test_two_rank_validation_equals_a_one_process_evaluation_of_the_checkpoint(tmp_path):
    require_distributed()
    log_dir = tmp_path / "run"
    check_ok(run_script([*BN_RUN, "--log-dir", log_dir], np=2))
    logged = {tag: _last(log_dir, f"val/{tag}") for tag in ("top1", "top5", "loss")}
    # The same checkpoint, one process, the same command plus --evaluate.
    alone = _evaluation(run_script([*BN_RUN, "--evaluate", "--log-dir", log_dir]))
    assert _count(alone["top1"]) == _count(logged["top1"])
    assert _count(alone["top5"]) == _count(logged["top5"])
    assert alone["loss"] == pytest.approx(logged["loss"], abs=2e-4)
    # And on two ranks: the same counts.
    both = _evaluation(run_script([*BN_RUN, "--evaluate", "--log-dir", log_dir], np=2))
    assert _count(both["top1"]) == _count(alone["top1"])
    assert _count(both["top5"]) == _count(alone["top5"])


def test_evaluate_trains_nothing_and_writes_its_figures(tmp_path):
    log_dir = tmp_path / "run"
    tiny = [*BN_RUN, "--model", "tinycnn", "--max-steps", "2"]
    check_ok(run_script([*tiny, "--log-dir", log_dir]))
    before = {p.name: p.stat().st_mtime_ns for p in list_checkpoints(log_dir)}
    figures = _evaluation(run_script([*tiny, "--evaluate", "--log-dir", log_dir]))
    assert {p.name: p.stat().st_mtime_ns for p in list_checkpoints(log_dir)} == before
    written = json.loads((log_dir / "evaluation-000000002.json").read_text())
    assert written["step"] == 2 and written["samples"] == 359
    for key in ("top1", "top5", "loss"):
        assert written[key] == pytest.approx(figures[key], abs=1e-2), key
    # A path works as well as auto.
    path = list_checkpoints(log_dir)[0]
    again = _evaluation(run_script([*tiny, "--evaluate", "--resume", path, "--log-dir", log_dir]))
    assert again == figures


@pytest.mark.parametrize("resume", ["auto", "none"])
def test_evaluate_without_a_checkpoint_exits_2(tmp_path, resume):
    result = run_script(
        ["--model", "tinycnn", "--evaluate", "--resume", resume, "--log-dir", tmp_path / "empty"]
    )
    assert result.returncode == 2, result.stderr
    assert "--evaluate" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
