"""The adaptive batch in the trainer, end to end: growth under mpirun (Horovod and DDP), bitwise
resume in the middle of growth, bad flags, and --test-type none leaving runs as they were."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import check_ok, require_distributed, run_script
from test_fault_tolerance import _assert_bitwise_equal, _state

from lars.config import parse_settings
from lars.errors import SettingError
from lars.fingerprint import run_identity, short_fingerprint, trajectory_settings
from lars.settings import GROUPS

TINY = ["--model", "tinycnn", "--workers", "0", "--threads", "1", "--log-interval", "4"]
# One rank x k = 2 at micro-batch 8; eta 0.8 makes the tinycnn grow in several steps
# (16 -> 24 -> 32 -> 64 on the sample set: k first, then the micro-batch), see GROWTH_LINE.
GROWING = [
    *TINY,
    "--test-type",
    "norm",
    "--eta",
    "0.8",
    "--batch-size",
    "8",
    "--batches-per-allreduce",
    "2",
    "--max-micro-batch-size",
    "16",
    "--max-batches-per-allreduce",
    "4",
    "--max-batch-size",
    "64",
]
GROWTH_LINE = re.compile(r"step (\d+): batch (\d+) -> (\d+) = (\d+) x (\d+) x (\d+)")


def _growth(out: str) -> list[tuple[int, ...]]:
    """(step, old, new, micro, ranks, k) of every growth line the run printed."""
    return [tuple(map(int, m.groups())) for m in GROWTH_LINE.finditer(out)]


def _check_growth(changes, max_batch, max_micro, max_k, ranks):
    assert len(changes) >= 2, changes
    previous = None
    for _step, old, new, micro, w, k in changes:
        assert w == ranks and new == micro * w * k
        assert old < new <= max_batch and micro <= max_micro and k <= max_k
        if previous is not None:  # never shrinks, neither factor
            assert old == previous[0] and micro >= previous[1] and k >= previous[2]
        previous = (new, micro, k)


def test_resumed_in_the_middle_of_growth_equals_uninterrupted_bitwise(tmp_path):
    common = [*GROWING, "--deterministic", "--epochs", "1"]
    whole = check_ok(run_script([*common, "--max-steps", "9", "--log-dir", tmp_path / "whole"]))
    changes = _growth(whole)
    _check_growth(changes, 64, 16, 4, 1)
    cut_at = changes[1][0]  # after the second growth, before the last one
    assert changes[-1][0] > cut_at and any(c[3] > 8 for c in changes if c[0] > cut_at)
    cut = [*common, "--log-dir", tmp_path / "cut"]
    check_ok(run_script([*cut, "--max-steps", cut_at]))
    resumed = check_ok(run_script([*cut, "--max-steps", "9"]))
    assert f"resumed at step {cut_at}" in resumed
    assert _growth(resumed) == [c for c in changes if c[0] > cut_at]
    a, b = _state(tmp_path / "whole", 9), _state(tmp_path / "cut", 9)
    for key in ("model", "optimizer", "scheduler"):
        _assert_bitwise_equal(a[key], b[key], key)
    assert repr(a["adaptive_batch"]) == repr(b["adaptive_batch"])  # floats exact; nan == nan
    state = a["adaptive_batch"]["state"]
    assert state["micro_batch"] * state["batches_per_allreduce"] == 64
    assert a["global_batch_size"] == 16  # the run's identity: its start batch


def _two_rank_run(tmp_path, backend):
    args = [
        *TINY,
        "--resume",
        "none",
        "--backend",
        backend,
        "--test-type",
        "norm",
        "--eta",
        "0.8",
        "--batch-size",
        "4",
        "--max-micro-batch-size",
        "12",
        "--max-batches-per-allreduce",
        "3",
        "--max-batch-size",
        "72",
        "--max-steps",
        "12",
        "--log-dir",
        tmp_path / backend,
    ]
    return check_ok(run_script(args, np=2))


@pytest.mark.distributed
def test_two_ranks_grow_within_both_caps_and_horovod_sees_k_passes(tmp_path):
    """2 ranks x k = 1 at micro-batch 4: n = 2 micro-batch gradients per test. Horovod raises
    ("Gradients were computed more than backward_passes_per_step times") when k grows without
    set_backward_passes_per_step, so a run that grows and finishes saw exactly k passes."""
    require_distributed()
    out = _two_rank_run(tmp_path, "horovod")
    changes = _growth(out)
    _check_growth(changes, 72, 12, 3, 2)
    assert changes[-1][3] > 4  # the micro-batch grew too (after k reached its cap)
    state = _state(tmp_path / "horovod")["adaptive_batch"]["state"]
    assert (state["micro_batch"], state["batches_per_allreduce"]) == changes[-1][3:6:2]
    assert state["samples_seen"] > 12 * 8
    from test_train_distributed import _scalars

    sizes = [value for _, value in _scalars(tmp_path / "horovod")["batch/size"]]
    assert sizes == sorted(sizes) and sizes[-1] == changes[-1][2]


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_grows_as_horovod_does(tmp_path):
    """The same run on torch.distributed (DDP's no_sync count follows k): the same decisions."""
    require_distributed()
    hvd, ddp = _two_rank_run(tmp_path, "horovod"), _two_rank_run(tmp_path, "torch")
    assert "2 rank(s) (torch, cpu)" in ddp
    assert [c[1:] for c in _growth(ddp)] == [c[1:] for c in _growth(hvd)]
    a, b = _state(tmp_path / "horovod"), _state(tmp_path / "torch")
    for x, y in zip(a["model"].values(), b["model"].values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--eta", "0"], "--eta"),
        (["--theta", "-1"], "--theta"),
        (["--nu", "0"], "--nu"),
        (["--max-batch-size", "8"], "--max-batch-size"),  # below the start (16)
        (["--max-micro-batch-size", "4"], "--max-micro-batch-size"),  # below --batch-size
        (["--max-batches-per-allreduce", "2"], "cannot reach --max-batch-size"),
        (["--batches-per-allreduce", "1"], "--batch-test-estimator micro-batch"),  # n = 1
        (["--max-batch-size", "2048", "--max-batches-per-allreduce", "200"], "training set"),
        (["--test-interval", "0"], "--test-interval"),
        (["--batch-test-ema", "1"], "--batch-test-ema"),
        (["--task", "barlowtwins"], "--task barlowtwins"),
    ],
)
def test_bad_adaptive_flags_are_refused_naming_the_flag(flags, named, tmp_path):
    from lars.adaptive.run import largest_plan
    from lars.plan import plan_run

    argv = [*GROWING, *flags, "--log-dir", str(tmp_path)]
    with pytest.raises(SettingError, match=re.escape(named)):
        settings = parse_settings(argv)
        largest_plan(settings, plan_run(settings, 1, 1400, 300))


def test_bad_adaptive_flag_exits_2_with_one_line():
    result = run_script([*GROWING, "--eta", "0", "--dry-run"])
    assert result.returncode == 2
    assert "--eta must be > 0" in result.stderr and len(result.stderr.splitlines()) == 1
    result = run_script([*TINY, "--test-type", "norm", "--batches-per-allreduce", "2"])
    assert result.returncode == 2 and "needs --max-batch-size" in result.stderr


def test_test_type_none_keeps_the_identity_of_every_run(tmp_path):
    """With --test-type none the adaptive flags are not part of the fingerprint (the default
    log dir and resume checks are those of runs made before the feature existed)."""
    base = parse_settings([*TINY, "--log-dir", str(tmp_path)])
    tuned = parse_settings([*TINY, "--eta", "0.5", "--max-batch-size", "999", "--log-dir", "x"])
    adaptive = set(GROUPS["adaptive"].split())
    before = {k: v for k, v in base.flat().items() if k not in adaptive}  # what main recorded
    assert trajectory_settings(base.flat()) == trajectory_settings(before)
    assert short_fingerprint(run_identity(base.flat(), 32)) == short_fingerprint(
        run_identity(before, 32)
    )
    assert short_fingerprint(run_identity(tuned.flat(), 32)) == short_fingerprint(
        run_identity(before, 32)
    )
    on = parse_settings([*GROWING, "--log-dir", str(tmp_path)])
    assert "eta" in trajectory_settings(on.flat())


def test_dry_run_explains_the_policy():
    out = check_ok(run_script([*GROWING, "--dry-run", "--log-dir", "/tmp/never-made"]))
    assert "adaptive batch     norm test (eta 0.8) every 1 step(s), micro-batch" in out
    assert "from 16 to at most 64" in out and "caps: micro-batch 16 per rank" in out
    assert "at the largest   64 = 16 x 1 x 4" in out
