"""What survives what: resume, preemption, rank failure, corrupt checkpoints, bad data, NaNs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import MPIRUN, ROOT, SCRIPT, check_ok, require_distributed, run_script

from lars.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from lars.faults import NONFINITE_EXIT_STATUS, REQUEUE_EXIT_STATUS

TINY = [
    "--model",
    "tinycnn",
    "--workers",
    "0",
    "--threads",
    "1",
    "--deterministic",
    "--epochs",
    "1",
    "--log-interval",
    "2",
]


def _state(log_dir, step=None):
    paths = list_checkpoints(log_dir)
    if step is not None:
        paths = [p for p in paths if p.name == f"checkpoint-{step:09d}.pt"]
    return load_checkpoint(paths[0])


def _assert_bitwise_equal(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("optimizer", ["lars", "tvlars", "lamb"])
def test_interrupted_and_resumed_equals_uninterrupted_bitwise(tmp_path, optimizer):
    hyper = {
        "lars": ["--base-lr", "5", "--bn-bias-separately", "--warmup-epochs", "0.1"],
        "tvlars": ["--base-lr", "5", "--lmbda", "0.05"],
        "lamb": ["--base-lr", "0.01", "--wd", "0.01"],
    }[optimizer]
    common = [*TINY, "--base-op", optimizer, *hyper, "--batch-size", "16"]
    check_ok(run_script([*common, "--max-steps", "12", "--log-dir", tmp_path / "whole"]))
    check_ok(run_script([*common, "--max-steps", "5", "--log-dir", tmp_path / "cut"]))
    assert _state(tmp_path / "cut")["step_in_epoch"] == 5  # stopped inside the epoch
    out = check_ok(run_script([*common, "--max-steps", "12", "--log-dir", tmp_path / "cut"]))
    assert "resumed at step 5" in out
    whole, cut = _state(tmp_path / "whole", 12), _state(tmp_path / "cut", 12)
    for key in ("model", "optimizer", "scheduler"):
        _assert_bitwise_equal(whole[key], cut[key], key)


def _start(args, np_):
    command = [sys.executable, str(SCRIPT), *map(str, args)]
    if np_ > 1:
        command = [str(MPIRUN), str(np_), *command]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _rank_pids(log_dir) -> list[int]:
    found = subprocess.run(
        ["pgrep", "-f", f"pytorch_imagenet_resnet.py.*{log_dir}"], capture_output=True, text=True
    ).stdout.split()
    pids = []
    for pid in map(int, found):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if b"python" in handle.read().split(b"\0")[0]:
                    pids.append(pid)
        except OSError:
            pass
    return pids


def _wait_for_training(process, log_dir, ranks, timeout=120):
    """Block until rank 0 printed a training step and all rank processes exist."""
    deadline = time.time() + timeout
    seen = []
    for line in process.stdout:
        seen.append(line)
        if " step " in line and "img/s" in line:
            break
        assert time.time() < deadline, "training did not start"
    else:
        raise AssertionError(
            "the run ended before training:\n" + "".join(seen) + process.stderr.read()
        )
    pids = []
    while len(pids) != ranks and time.time() < deadline:
        pids = _rank_pids(log_dir)
    assert len(pids) == ranks, pids
    return pids


LONG = [
    "--model",
    "resnet18_small",
    "--batch-size",
    "8",
    "--workers",
    "0",
    "--threads",
    "1",
    "--log-interval",
    "1",
    "--epochs",
    "3",
]


@pytest.mark.distributed
@pytest.mark.parametrize("signum, only_rank_1", [(signal.SIGTERM, False), (signal.SIGUSR1, True)])
def test_preemption_signal_checkpoints_and_exits_for_requeue(tmp_path, signum, only_rank_1):
    require_distributed()
    log_dir = tmp_path / "run"
    process = _start([*LONG, "--log-dir", log_dir], 2)
    pids = _wait_for_training(process, log_dir, 2)
    for pid in pids[1:] if only_rank_1 else pids:  # the other rank learns by agreement
        os.kill(pid, signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == REQUEUE_EXIT_STATUS, out + err
    assert "run the same command again to resume" in err
    stopped = _state(log_dir)
    assert 0 < stopped["global_step"] < 3 * 89 and stopped["step_in_epoch"] > 0
    resumed = check_ok(
        run_script([*LONG, "--log-dir", log_dir, "--max-steps", stopped["global_step"] + 2], np=2)
    )
    assert f"resumed at step {stopped['global_step']}" in resumed
    assert _state(log_dir)["global_step"] == stopped["global_step"] + 2


@pytest.mark.distributed
def test_a_dead_rank_ends_the_job_within_bounds(tmp_path):
    require_distributed()
    log_dir = tmp_path / "run"
    process = _start([*LONG, "--log-dir", log_dir], 2)
    pids = _wait_for_training(process, log_dir, 2)
    started = time.time()
    os.kill(max(pids), signal.SIGKILL)
    process.communicate(timeout=90)
    assert process.returncode != 0
    assert time.time() - started < 60


@pytest.mark.distributed
def test_a_hung_rank_ends_the_job_within_the_stall_timeout(tmp_path):
    require_distributed()
    log_dir = tmp_path / "run"
    process = _start([*LONG, "--log-dir", log_dir, "--stall-timeout", "10"], 2)
    pids = _wait_for_training(process, log_dir, 2)
    started = time.time()
    hung = max(pids)
    os.kill(hung, signal.SIGSTOP)
    try:
        out, err = process.communicate(timeout=120)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert process.returncode != 0
    assert time.time() - started < 90, out + err
    assert "no progress for" in err


def test_truncated_newest_checkpoint_is_skipped(tmp_path):
    log_dir = tmp_path / "run"
    check_ok(
        run_script(
            [*TINY, "--max-steps", "4", "--checkpoint-every-steps", "2", "--log-dir", log_dir]
        )
    )
    newest = list_checkpoints(log_dir)[0]
    assert newest.name.endswith("000000004.pt")
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    out = run_script([*TINY, "--max-steps", "6", "--log-dir", log_dir])
    assert out.returncode == 0, out.stderr
    assert "skipping" in out.stdout + out.stderr and "resumed at step 2" in out.stdout


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model": _Exploit(marker)}, evil)
    with pytest.raises(ValueError, match="unsafe"):
        load_checkpoint(evil)
    result = run_script([*TINY, "--resume", evil, "--log-dir", tmp_path / "run"])
    assert result.returncode == 2 and "--resume" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    for step in range(5):
        save_checkpoint({"model": {"w": torch.ones(2) * step}}, tmp_path, step, keep=3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"checkpoint-{s:09d}.pt" for s in (2, 3, 4)]  # no temporary files left
    assert torch.equal(
        load_checkpoint(list_checkpoints(tmp_path)[0])["model"]["w"], torch.full((2,), 4.0)
    )


@pytest.fixture
def corrupt_dataset(tmp_path, sample_root):
    root = tmp_path / "data"
    for split in ("train", "val"):
        shutil.copytree(sample_root / split, root / split)
    good = sorted((root / "train" / "3").iterdir())[0].read_bytes()
    (root / "train" / "3" / "truncated.JPEG").write_bytes(good[: len(good) // 3])
    (root / "train" / "4" / "garbage.JPEG").write_bytes(os.urandom(2000))
    (root / "train" / "5" / "notes.JPEG").write_text("not an image\n")
    (root / "val" / "6" / "empty.JPEG").write_bytes(b"")
    return root


def test_unreadable_images_are_skipped_and_counted(tmp_path, corrupt_dataset):
    out = check_ok(
        run_script(
            [
                *TINY,
                "--train-dir",
                corrupt_dataset / "train",
                "--val-dir",
                corrupt_dataset / "val",
                "--image-size",
                "32",
                "--val-crop-ratio",
                "1",
                "--warmup-epochs",
                "0",
                "--batch-size",
                "64",
                "--log-dir",
                tmp_path / "run",
            ]
        )
    )
    assert "3 unreadable file(s) skipped in training" in out
    for name in ("truncated.JPEG", "garbage.JPEG", "notes.JPEG"):
        assert name in out
    assert "1 unreadable file(s) skipped in validation" in out and "empty.JPEG" in out
    assert "(359 images)" in out  # the val set less the unreadable file


def test_strict_data_makes_them_fatal(tmp_path, corrupt_dataset):
    result = run_script(
        [
            *TINY,
            "--train-dir",
            corrupt_dataset / "train",
            "--val-dir",
            corrupt_dataset / "val",
            "--image-size",
            "32",
            "--warmup-epochs",
            "0",
            "--batch-size",
            "64",
            "--strict-data",
            "--log-dir",
            tmp_path / "run",
        ]
    )
    assert result.returncode == 2, result.stderr
    assert "unreadable file" in result.stderr and "Traceback" not in result.stderr


NAN_SCRIPT = ROOT / "tests" / "helpers" / "inject_nan.py"


def test_nan_steps_are_skipped_and_never_reach_a_checkpoint(tmp_path):
    out = check_ok(
        run_script(
            [*TINY, "--max-steps", "6", "--log-dir", tmp_path / "run"],
            script=NAN_SCRIPT,
            env={"NAN_AT_CALLS": "2,3"},
        )
    )
    assert "2 non-finite step(s) skipped" in out
    state = _state(tmp_path / "run")
    assert state["nonfinite_steps"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_nan_aborts_with_the_last_good_state(tmp_path):
    log_dir = tmp_path / "run"
    result = run_script(
        [*TINY, "--max-steps", "6", "--nonfinite", "abort", "--log-dir", log_dir],
        script=NAN_SCRIPT,
        env={"NAN_AT_CALLS": "3"},
    )
    assert result.returncode == NONFINITE_EXIT_STATUS, result.stderr
    assert "non-finite" in result.stderr
    state = _state(log_dir)
    assert state["global_step"] == 3
    assert all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.distributed
def test_nan_on_one_rank_is_skipped_on_both(tmp_path):
    """The averaged gradient is NaN on every rank, so both skip the same step."""
    require_distributed()
    out = check_ok(
        run_script(
            [*TINY, "--max-steps", "4", "--log-dir", tmp_path / "run"],
            np=2,
            script=NAN_SCRIPT,
            env={"NAN_AT_CALLS": "2"},
        )
    )
    assert "1 non-finite step(s) skipped" in out
    assert all(torch.isfinite(t).all() for t in _state(tmp_path / "run")["model"].values())
