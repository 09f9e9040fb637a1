"""launch/slurm.sbatch's decisions from what SLURM reports (fake srun/scontrol/squeue on PATH,
from tests/test_launch.py): requeue, cancel, SLURM's own requeue, short time limits, logs.
The same scenarios against a real SLURM: tests/test_slurm_real.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest
from test_launch import JOB_ID, ROOT, SBATCH_SCRIPT, FakeCluster, wait_for


@pytest.fixture
def cluster(tmp_path) -> FakeCluster:
    return FakeCluster(tmp_path)


def job_info(cluster, state: str, reason: str, restarts: int, stdout: str = "/dev/null") -> None:
    """What `scontrol show job -o` answers from now on (the forms measured on Slurm 22.05 are
    listed in launch/slurm/job_state.sh)."""
    (cluster.logs / "job.info").write_text(
        f"JobId={JOB_ID} JobName=x UserId=root(0) JobState={state} Reason={reason} "
        f"Dependency=(null) Requeue=1 Restarts={restarts} BatchFlag=1 StdOut={stdout}\n"
    )


def test_a_cancelled_job_is_never_requeued(cluster):
    """scancel: SLURM sends SIGTERM, the training checkpoints and exits 3; `scontrol requeue`
    would succeed and bring the cancelled job back, so the script must not call it."""
    job_info(cluster, "COMPLETING", "None", 0)
    result = cluster.sbatch(str(SBATCH_SCRIPT), FAKE_SRUN_STATUS="3")
    assert result.returncode == 3, result.stderr
    assert cluster.requeues() == []
    assert "was cancelled" in result.stderr and "sbatch -J" not in result.stderr


def test_the_time_limit_without_a_warning_requeues(cluster):
    job_info(cluster, "COMPLETING", "TimeLimit", 2)
    result = cluster.sbatch(str(SBATCH_SCRIPT), FAKE_SRUN_STATUS="3", SLURM_RESTART_COUNT="2")
    assert result.returncode == 0, result.stderr
    assert cluster.requeues() == [f"requeue {JOB_ID}"]
    assert "restart 3 of at most 20" in result.stderr


def test_a_job_slurm_already_requeued_is_left_alone_and_no_resubmission_is_advised(cluster):
    """An admin's `scontrol requeue` or preemption with PreemptMode=REQUEUE: the job's Restarts
    count went up while it ran; a second requeue fails and a resubmission would duplicate it."""
    job_info(cluster, "RUNNING", "None", 0)
    job = cluster.start(
        str(SBATCH_SCRIPT),
        FAKE_SRUN_MODE="trap",
        FAKE_JOB_INFO_ON_STOP=f"JobId={JOB_ID} JobState=COMPLETING Reason=None Restarts=1",
    )
    try:
        wait_for((cluster.logs / "trap.pid").exists, 30, "the fake training to start")
        os.kill(int((cluster.logs / "trap.pid").read_text()), signal.SIGTERM)
        job.send_signal(signal.SIGTERM)
        output, _ = job.communicate(timeout=30)
    finally:
        job.kill()
    assert job.returncode == 0, output
    assert cluster.requeues() == []
    assert "already requeued" in output and "sbatch -J" not in output


@pytest.mark.parametrize("reason, requeued", [("TimeLimit", True), ("None", False)])
def test_a_failure_after_sigterm_is_requeued_only_at_the_time_limit(cluster, reason, requeued):
    """LAUNCHER=mpirun: at the time limit mpirun kills the ranks after SLURM's SIGTERM and exits
    1 (measured), usually after the checkpoint is written; a cancelled job still ends."""
    job_info(cluster, "COMPLETING", reason, 0)
    job = cluster.start(str(SBATCH_SCRIPT), FAKE_SRUN_MODE="trap", FAKE_TRAP_STATUS="1")
    try:
        wait_for((cluster.logs / "trap.pid").exists, 30, "the fake training to start")
        job.send_signal(signal.SIGTERM)
        os.kill(int((cluster.logs / "trap.pid").read_text()), signal.SIGTERM)
        output, _ = job.communicate(timeout=30)
    finally:
        job.kill()
    assert job.returncode == (0 if requeued else 1), output
    assert cluster.requeues() == ([f"requeue {JOB_ID}"] if requeued else [])


def test_a_time_limit_that_leaves_no_time_is_refused_and_a_short_one_warned(cluster):
    # The header asks for the warning 300 s before the end; SLURM may send it 60 s earlier.
    refused = cluster.sbatch(str(SBATCH_SCRIPT), FAKE_TIME_LEFT="5:00")
    assert refused.returncode == 2 and cluster.args("srun") is None
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "--time" in refused.stderr and "--signal=B:USR1@300" in refused.stderr
    short = cluster.sbatch(str(SBATCH_SCRIPT), FAKE_TIME_LEFT="8:00")
    assert short.returncode == 0 and cluster.args("srun") is not None
    assert "only about 120 s" in short.stderr and "raise --time" in short.stderr
    fine = cluster.sbatch(str(SBATCH_SCRIPT), FAKE_TIME_LEFT="1-00:00:00")
    assert fine.returncode == 0 and "warning" not in fine.stderr
    no_warning = cluster.sbatch(str(SBATCH_SCRIPT), FAKE_TIME_LEFT="5:00", WARN_SECONDS="0")
    assert no_warning.returncode == 0 and "warning" not in no_warning.stderr


def test_the_run_folder_links_to_the_job_output(cluster, tmp_path):
    output = tmp_path / "logs" / f"exp-{JOB_ID}.out"
    output.parent.mkdir()
    output.write_text("job output\n")
    job_info(cluster, "RUNNING", "None", 0, stdout=str(output))
    result = cluster.sbatch("-J", "exp", str(SBATCH_SCRIPT))
    assert result.returncode == 0, result.stderr
    link = cluster.log_root / "exp" / f"slurm-{JOB_ID}.out"
    assert link.read_text() == "job output\n"


def test_output_goes_to_an_ignored_logs_folder_that_exists_in_every_checkout():
    header = SBATCH_SCRIPT.read_text()
    assert re.search(r"^#SBATCH --output=logs/%x-%j\.out$", header, re.M)
    assert (ROOT / "logs").is_dir()  # SLURM does not create --output's folder
    tracked = subprocess.run(
        ["git", "ls-files", "logs"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    assert tracked == ["logs/README.md"]
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "--no-index", "logs/lars-imagenet-1.out"], cwd=ROOT
    )
    assert ignored.returncode == 0
