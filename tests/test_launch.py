"""launch/: shell syntax, the SLURM batch script's logic (with fake srun/scontrol/sbatch/mpirun on
PATH) and, once the trainer has its requeue exit status, a real checkpoint-requeue-resume cycle."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH_SCRIPT = ROOT / "launch" / "slurm.sbatch"
JOB_ID = "4242"
TINY_RUN = ["--model", "tinycnn", "--workers", "0", "--threads", "1"]

# Each fake records its arguments, NUL-separated, in $FAKE_LOG_DIR/<name>.args.
FAKES = {
    # srun: exit with FAKE_SRUN_STATUS; FAKE_SRUN_MODE=exec runs the command after srun's own
    # options (one task, like `srun -n 1`); FAKE_SRUN_MODE=trap acts as a training that, on its
    # first SIGUSR1 or SIGTERM, takes half a second to "checkpoint" (recording any further
    # signal) and exits 3.
    "srun": """
printf '%s\\0' "$@" > "$FAKE_LOG_DIR/srun.args"
echo "${OMP_NUM_THREADS:-unset}" > "$FAKE_LOG_DIR/srun.omp"
case ${FAKE_SRUN_MODE:-status} in
  exec) while [ $# -gt 0 ] && [[ $1 == -* ]]; do shift; done; exec "$@" ;;
  trap) stop=0
        trap 'echo USR1 >> "$FAKE_LOG_DIR/trap.signals"; stop=1' USR1
        on_term() {
          echo TERM >> "$FAKE_LOG_DIR/trap.signals"; stop=1
          info=${FAKE_JOB_INFO_ON_STOP:-}
          [ -z "$info" ] || echo "$info" > "$FAKE_LOG_DIR/job.info"
        }
        trap on_term TERM
        echo $$ > "$FAKE_LOG_DIR/trap.pid"
        while [ "$stop" = 0 ]; do sleep 0.05; done
        sleep 0.5
        exit "${FAKE_TRAP_STATUS:-3}" ;;
esac
exit "${FAKE_SRUN_STATUS:-0}"
""",
    # scontrol: `show job -o ID` prints $FAKE_LOG_DIR/job.info (a test may rewrite it while the
    # job runs; default: a running job that was never requeued); `requeue` exits with
    # FAKE_SCONTROL_STATUS. Every call is one line of scontrol.calls.
    "scontrol": """
printf '%s\\0' "$@" > "$FAKE_LOG_DIR/scontrol.args"
echo "$*" >> "$FAKE_LOG_DIR/scontrol.calls"
if [ "$1" = show ]; then
  if [ -f "$FAKE_LOG_DIR/job.info" ]; then cat "$FAKE_LOG_DIR/job.info"
  else echo "JobId=$3 JobState=RUNNING Reason=None Restarts=${SLURM_RESTART_COUNT:-0} StdOut=x"
  fi
  exit 0
fi
exit "${FAKE_SCONTROL_STATUS:-0}"
""",
    "squeue": """
echo "${FAKE_TIME_LEFT:-UNLIMITED}"
""",
    "mpirun": """
if [ "${1:-}" = --version ]; then echo "fake mpirun"; exit 0; fi
printf '%s\\0' "$@" > "$FAKE_LOG_DIR/mpirun.args"
exit "${FAKE_MPIRUN_STATUS:-0}"
""",
    # sbatch: runs the job at once in this process (like `sbatch --wait`), with the variables
    # SLURM sets for a batch job; the job name comes from -J/--job-name or the script's #SBATCH.
    "sbatch": """
printf '%s\\0' "$@" > "$FAKE_LOG_DIR/sbatch.args"
name=""
while [ $# -gt 0 ] && [[ $1 == -* ]]; do
  case $1 in -J) shift; name=$1 ;; --job-name=*) name=${1#--job-name=} ;; esac
  shift
done
script=$1; shift
[ -n "$name" ] || name=$(sed -n 's/^#SBATCH --job-name=//p' "$script" | head -n 1)
export SLURM_JOB_ID=${FAKE_JOB_ID:-4242} SLURM_JOB_NAME=$name SLURM_SUBMIT_DIR=$PWD
exec bash "$script" "$@"
""",
}


class FakeCluster:
    """A PATH with fake SLURM/MPI commands, and what they were called with."""

    def __init__(self, tmp_path: Path) -> None:
        self.bin = tmp_path / "bin"
        self.logs = tmp_path / "calls"
        self.log_root = tmp_path / "runs"
        self.bin.mkdir()
        self.logs.mkdir()
        for name, body in FAKES.items():
            path = self.bin / name
            path.write_text("#!/usr/bin/env bash\n" + body.lstrip())
            path.chmod(0o755)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
        env.pop("OMP_NUM_THREADS", None)
        env.update(
            PATH=f"{self.bin}{os.pathsep}{env['PATH']}",
            FAKE_LOG_DIR=str(self.logs),
            LARS_VENV=sys.prefix,
            LOG_ROOT=str(self.log_root),
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def requeues(self) -> list[str]:
        """The `scontrol requeue` calls, as their argument strings."""
        path = self.logs / "scontrol.calls"
        calls = path.read_text().splitlines() if path.exists() else []
        return [call for call in calls if call.startswith("requeue")]

    def args(self, name: str) -> list[str] | None:
        path = self.logs / f"{name}.args"
        return path.read_text().split("\0")[:-1] if path.exists() else None

    def sbatch(self, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["sbatch", *args],
            cwd=ROOT,
            env=self.env(**env),
            text=True,
            capture_output=True,
            timeout=timeout,
        )

    def start(self, *args: str, **env: str) -> subprocess.Popen:
        return subprocess.Popen(
            ["sbatch", *args],
            cwd=ROOT,
            env=self.env(**env),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture
def cluster(tmp_path) -> FakeCluster:
    return FakeCluster(tmp_path)


def test_every_launch_script_parses():
    scripts = sorted((ROOT / "launch").glob("*.sh")) + [SBATCH_SCRIPT]
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"


def test_sbatch_header_is_read_by_sbatch_and_asks_for_what_requeueing_needs():
    lines = SBATCH_SCRIPT.read_text().splitlines()
    first_command = next(
        i for i, line in enumerate(lines[1:], 1) if line.strip() and not line.startswith("#")
    )
    # sbatch stops reading #SBATCH lines at the first command: none may come after it.
    assert not any(line.startswith("#SBATCH") for line in lines[first_command:])
    options = dict(
        line[len("#SBATCH ") :].split("=", 1)
        for line in lines[:first_command]
        if line.startswith("#SBATCH --") and "=" in line
    )
    flags = {line.split()[1] for line in lines[:first_command] if line.startswith("#SBATCH --")}
    assert "--requeue" in flags
    assert options["--open-mode"] == "append"
    assert options["--ntasks-per-node"] == options["--gpus-per-node"]  # one rank per GPU
    assert "--cpus-per-task" in options and "--time" in options and "--nodes" in options
    # B: signals the batch shell only; the script forwards the signal to the launcher.
    match = re.fullmatch(r"B:USR1@(\d+)", options["--signal"])
    assert match and int(match.group(1)) > 60, options["--signal"]


def test_srun_gets_the_training_command_and_its_arguments(cluster):
    train_args = ["--model", "resnet50", "--train-dir", "/data/image net/train", "--wd=1e-4"]
    result = cluster.sbatch(
        "-J", "r50-lars", str(SBATCH_SCRIPT), *train_args, SLURM_CPUS_PER_TASK="6"
    )
    assert result.returncode == 0, result.stderr
    assert cluster.args("srun") == [
        "--mpi=pmix",
        "--cpus-per-task=6",
        "python",
        "pytorch_imagenet_resnet.py",
        "--log-dir",
        str(cluster.log_root / "r50-lars"),
        *train_args,
    ]
    assert cluster.requeues() == []


def test_srun_ranks_get_the_launch_defaults_of_launch_env_sh(cluster):
    """launch/env.sh's defaults, as launch/mpirun.sh sets them: threads per rank from the
    allocation (cores per task); a value the user set wins."""
    allocation = {"SLURM_CPUS_PER_TASK": "6", "SLURM_NTASKS_PER_NODE": "4"}
    assert cluster.sbatch(str(SBATCH_SCRIPT), **allocation).returncode == 0
    assert (cluster.logs / "srun.omp").read_text().strip() == "6"
    assert cluster.sbatch(str(SBATCH_SCRIPT), OMP_NUM_THREADS="2", **allocation).returncode == 0
    assert (cluster.logs / "srun.omp").read_text().strip() == "2"


def test_srun_mpi_type_extra_flags_and_a_given_log_dir(cluster):
    result = cluster.sbatch(
        str(SBATCH_SCRIPT),
        "--log-dir=/scratch/mine",
        "--epochs",
        "2",
        SRUN_MPI="pmi2",
        SRUN_EXTRA_FLAGS="--kill-on-bad-exit=1 -l",
    )
    assert result.returncode == 0, result.stderr
    assert cluster.args("srun") == [
        "--mpi=pmi2",
        "--kill-on-bad-exit=1",
        "-l",
        "python",
        "pytorch_imagenet_resnet.py",
        "--log-dir=/scratch/mine",
        "--epochs",
        "2",
    ]


def test_mpirun_launcher_starts_one_rank_per_task(cluster):
    result = cluster.sbatch(
        "-J", "exp", str(SBATCH_SCRIPT), "--epochs", "1", LAUNCHER="mpirun", SLURM_NTASKS="8"
    )
    assert result.returncode == 0, result.stderr
    assert cluster.args("mpirun") == [
        "-np",
        "8",
        "python",
        "pytorch_imagenet_resnet.py",
        "--log-dir",
        str(cluster.log_root / "exp"),
        "--epochs",
        "1",
    ]


def test_requeue_status_requeues_the_job_and_exits_0(cluster):
    result = cluster.sbatch(str(SBATCH_SCRIPT), FAKE_SRUN_STATUS="3")
    assert result.returncode == 0, result.stderr
    assert cluster.requeues() == [f"requeue {JOB_ID}"]
    assert "requeueing job 4242" in result.stderr


@pytest.mark.parametrize("status", [1, 2, 137])
def test_other_failures_are_passed_on(cluster, status):
    result = cluster.sbatch(str(SBATCH_SCRIPT), FAKE_SRUN_STATUS=str(status))
    assert result.returncode == status
    assert cluster.requeues() == []
    assert f"training exited with status {status}" in result.stderr


def test_no_requeue_when_scontrol_fails_or_after_max_requeues(cluster):
    failed = cluster.sbatch(str(SBATCH_SCRIPT), FAKE_SRUN_STATUS="3", FAKE_SCONTROL_STATUS="1")
    assert failed.returncode == 3 and "scontrol requeue 4242 failed" in failed.stderr
    (cluster.logs / "scontrol.calls").unlink()
    limit = cluster.sbatch(
        str(SBATCH_SCRIPT), FAKE_SRUN_STATUS="3", SLURM_RESTART_COUNT="5", MAX_REQUEUES="5"
    )
    assert limit.returncode == 3 and "not requeueing" in limit.stderr
    assert cluster.requeues() == []


def test_bad_setup_exits_2_with_one_line(cluster, tmp_path):
    outside = subprocess.run(
        ["bash", str(SBATCH_SCRIPT)],
        cwd=ROOT,
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    cases = [
        outside,
        cluster.sbatch(str(SBATCH_SCRIPT), LAUNCHER="pbs"),
        cluster.sbatch(str(SBATCH_SCRIPT), LARS_VENV=str(tmp_path / "no-venv")),
        cluster.sbatch(str(SBATCH_SCRIPT), LARS_ROOT=str(tmp_path)),
    ]
    for result, named in zip(cases, ["SLURM_JOB_ID", "LAUNCHER", "no-venv", "LARS_ROOT"]):
        assert result.returncode == 2, result
        assert len(result.stderr.strip().splitlines()) == 1 and named in result.stderr
    assert cluster.args("srun") is None


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_warning_signal_to_the_batch_shell_reaches_the_training_once(cluster):
    """--signal=B:USR1@... signals the batch shell only: it must pass one SIGUSR1 to the
    launcher, keep waiting for it, and requeue when it exits 3."""
    job = cluster.start(str(SBATCH_SCRIPT), FAKE_SRUN_MODE="trap")
    try:
        wait_for((cluster.logs / "trap.pid").exists, 30, "the fake training to start")
        job.send_signal(signal.SIGUSR1)
        output, _ = job.communicate(timeout=30)
    finally:
        job.kill()
    assert job.returncode == 0, output
    assert (cluster.logs / "trap.signals").read_text() == "USR1\n"
    assert cluster.requeues() == [f"requeue {JOB_ID}"]
    assert "got SIGUSR1" in output


def test_sigterm_keeps_the_batch_shell_waiting_and_is_not_passed_on(cluster):
    """At the time limit, scancel or preemption SLURM sends SIGTERM to the batch shell and to the
    ranks itself. Passing it on would be a second signal, which makes the training exit at once
    without its checkpoint; the shell must just outlive the training and requeue."""
    job = cluster.start(str(SBATCH_SCRIPT), FAKE_SRUN_MODE="trap")
    try:
        wait_for((cluster.logs / "trap.pid").exists, 30, "the fake training to start")
        training_pid = int((cluster.logs / "trap.pid").read_text())
        job.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert job.poll() is None, "the batch shell died of SIGTERM"
        os.kill(training_pid, signal.SIGTERM)  # what SLURM sends the ranks
        output, _ = job.communicate(timeout=30)
    finally:
        job.kill()
    assert job.returncode == 0, output
    assert (cluster.logs / "trap.signals").read_text() == "TERM\n"
    assert cluster.requeues() == [f"requeue {JOB_ID}"]
    assert "got SIGTERM" in output


def newest_checkpoint_step(log_dir: Path) -> int:
    steps = [
        int(m.group(1))
        for path in log_dir.glob("checkpoint-*.pt")
        if (m := re.fullmatch(r"checkpoint-(\d+)\.pt", path.name))
    ]
    assert steps, f"no checkpoint in {log_dir}: {sorted(os.listdir(log_dir))}"
    return max(steps)


@pytest.mark.slow
def test_real_training_through_the_batch_script(cluster):
    result = cluster.sbatch(
        "-J",
        "tiny",
        str(SBATCH_SCRIPT),
        *TINY_RUN,
        "--max-steps",
        "4",
        timeout=300,
        FAKE_SRUN_MODE="exec",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    log_dir = cluster.log_root / "tiny"
    assert newest_checkpoint_step(log_dir) == 4 and (log_dir / "config.json").exists()
    assert cluster.requeues() == []


@pytest.mark.slow
def test_real_training_checkpoints_on_sigusr1_is_requeued_and_resumes(cluster):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import lars.signals

    script_status = re.search(r"^REQUEUE_EXIT_STATUS=(\d+)$", SBATCH_SCRIPT.read_text(), re.M)
    assert int(script_status.group(1)) == lars.signals.REQUEUE_EXIT_STATUS
    log_dir = cluster.log_root / "requeue"
    run_args = [*TINY_RUN, "--epochs", "50", "--log-interval", "1"]
    job = cluster.start(
        "-J", "requeue", str(SBATCH_SCRIPT), *run_args, "--max-steps", "2000", FAKE_SRUN_MODE="exec"
    )
    lines: list[str] = []
    training = threading.Event()

    def read_output() -> None:
        for line in job.stdout:
            lines.append(line)
            if re.search(r"step \d+/", line):
                training.set()

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        assert training.wait(240), "the training never logged a step:\n" + "".join(lines)
        job.send_signal(signal.SIGUSR1)  # what SLURM does with --signal=B:USR1@...
        job.wait(timeout=120)
    finally:
        job.kill()
    reader.join(timeout=10)
    output = "".join(lines)
    assert job.returncode == 0, output
    assert cluster.requeues() == [f"requeue {JOB_ID}"], output
    stopped_at = newest_checkpoint_step(log_dir)
    assert 0 < stopped_at < 2000, output
    first_events = set(log_dir.glob("events.out.tfevents.*"))

    # The requeued job runs the same script again (same job id and name): it must resume.
    (cluster.logs / "scontrol.calls").unlink()
    again = cluster.sbatch(
        "-J",
        "requeue",
        str(SBATCH_SCRIPT),
        *run_args,
        "--max-steps",
        str(stopped_at + 3),
        timeout=300,
        FAKE_SRUN_MODE="exec",
        SLURM_RESTART_COUNT="1",
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert cluster.requeues() == []
    assert newest_checkpoint_step(log_dir) == stopped_at + 3
    resumed_steps = []
    for new_events in set(log_dir.glob("events.out.tfevents.*")) - first_events:
        accumulator = EventAccumulator(str(new_events))  # the scalars, and the hparams file
        accumulator.Reload()
        if "train/loss" in accumulator.Tags()["scalars"]:
            resumed_steps += [event.step for event in accumulator.Scalars("train/loss")]
    assert min(resumed_steps) == stopped_at + 1, resumed_steps
