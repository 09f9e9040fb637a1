"""launch/slurm.sbatch against a real single-node SLURM (22.05, munge), end to end.

Root on Debian only: the module installs slurm-wlm and munge once (apt-get), starts munged,
slurmctld and slurmd from a generated slurm.conf in a temporary folder
(launch/slurm/local_cluster.py) and stops them, by PID, at the end. Elsewhere it is skipped, with
the reason. Every job is a tiny 2-rank run (tinycnn on the sample set, --threads 1, srun
--mpi=pmix) under `nice`, so the machine stays usable. The first scenarios run at the same time
(the node declares 8 CPUs), each waiting on SLURM's own state with bounded polls; preemption
needs the node to itself and runs last. A requeued job waits about two minutes for its BeginTime:
the tests set StartTime=now. The runs read --config from a file the tests rewrite between a
stop and the resume (`max-steps`), so a resumed run ends a few steps after its checkpoint
whatever the machine's speed.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "slurm.sbatch"
TRAIN = ["--model", "tinycnn", "--workers", "0", "--threads", "1", "--log-interval", "1"]
LONG = 100000  # max-steps of a run that must be stopped by a signal, never by its end


def _skip_reason() -> str | None:
    if os.environ.get("LARS_SKIP_SLURM"):
        return "LARS_SKIP_SLURM is set"
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs root on Linux (installs and starts SLURM daemons)"
    if not (Path("/etc/debian_version").exists() and shutil.which("apt-get")):
        return "needs Debian (apt-get install slurm-wlm munge)"
    if importlib.util.find_spec("horovod") is None and not os.environ.get(
        "LARS_REQUIRE_DISTRIBUTED"
    ):
        return "needs Horovod for the 2-rank runs (launch/setup.sh)"
    return None


SKIP = _skip_reason()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(SKIP is not None, reason=f"real SLURM tests: {SKIP}"),
]


def _load_local_cluster():
    spec = importlib.util.spec_from_file_location(
        "local_cluster", ROOT / "launch" / "slurm" / "local_cluster.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Slurm:
    """The running cluster, and the jobs the tests submit to it."""

    def __init__(self, local, tmp: Path) -> None:
        self.local, self.tmp = local, tmp
        venv = tmp / "venv" / "bin"  # the project's Python, niced: the machine is shared
        venv.mkdir(parents=True)
        (venv / "python").write_text(f'#!/bin/sh\nexec nice -n 10 "{sys.executable}" "$@"\n')
        (venv / "python").chmod(0o755)
        self.env = dict(
            local.env,
            LARS_VENV=str(venv.parent),
            LOG_ROOT=str(tmp / "runs"),
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS="1",
        )

    def submit(self, name: str, *sbatch: str, script=SCRIPT, max_steps=LONG, **env: str) -> str:
        config = self.config(name, max_steps)
        out = subprocess.run(
            ["sbatch", "--parsable", "-J", name, "--nodes=1", "--ntasks-per-node=2"]
            + ["--cpus-per-task=1", "--gpus-per-node=0", f"--output={self.tmp}/{name}-%j.out"]
            + [*sbatch, str(script), *TRAIN, "--config", str(config)],
            cwd=ROOT,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().split(";")[0]

    def config(self, name: str, max_steps: int) -> Path:
        """The run's --config: the sample set has 22 steps an epoch; `epochs` keeps a run that
        must be stopped by a signal going long enough."""
        path = self.tmp / f"{name}.yaml"
        path.write_text(f"max-steps: {max_steps}\nepochs: 1000\n")
        return path

    def job(self, job_id: str) -> dict[str, str]:
        out = self.local.scontrol("show", "job", "-o", job_id, check=False)
        return dict(re.findall(r"(\S+?)=(\S*)", out))

    def scontrol(self, *args: str) -> str:
        return self.local.scontrol(*args)

    def log(self, name: str, job_id: str) -> str:
        path = self.tmp / f"{name}-{job_id}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_dir(self, name: str) -> Path:
        return self.tmp / "runs" / name

    def wait(self, condition, timeout: float, what: str, job_id: str = "", name: str = ""):
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                state = self.job(job_id) if job_id else {}
                log = self.log(name, job_id)[-3000:] if name else ""
                raise AssertionError(
                    f"timed out after {timeout:g} s waiting for {what}: {state}\n{log}"
                )
            time.sleep(1)

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "")

    def steps(self, name: str, job_id: str, after: str = "") -> list[int]:
        """Optimizer steps the training logged (after the line holding `after`)."""
        text = self.log(name, job_id)
        if after:
            text = text[text.find(after) :] if after in text else ""
        return [int(s) for s in re.findall(r"\bstep (\d+)/\d+", text)]

    def training(self, name: str, job_id: str, after: str = "") -> None:
        """Wait until the job's training has logged a step (start-up is over)."""
        self.wait(lambda: self.steps(name, job_id, after), 300, "a training step", job_id, name)

    def ended(self, job_id: str, timeout: float = 240) -> dict[str, str]:
        final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL")
        self.wait(lambda: self.state(job_id) in final, timeout, "the job to end", job_id)
        return self.job(job_id)

    def release_requeued(self, name: str, job_id: str, restarts: int, **update: str) -> None:
        """Wait for SLURM to hold the requeued job for its BeginTime, then start it now (with
        any other `scontrol update` fields). The config makes the resumed run short."""

        def pending() -> bool:
            job = self.job(job_id)
            return job.get("JobState") == "PENDING" and job.get("Restarts") == str(restarts)

        self.wait(pending, 180, f"the job pending after requeue {restarts}", job_id, name)
        stopped = newest_checkpoint(self.log_dir(name))
        self.config(name, stopped + 3)
        fields = [f"{k}={v}" for k, v in {"StartTime": "now", **update}.items()]
        self.scontrol("update", f"JobId={job_id}", *fields)
        return stopped

    def rank_pids(self, job_id: str) -> dict[int, int]:
        """{SLURM_PROCID: pid} of the job's training processes."""
        pids = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes()
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"pytorch_imagenet_resnet.py" not in cmdline or b"nice" in cmdline.split(b"\0")[0]:
                continue
            env = dict(e.split(b"=", 1) for e in environ if b"=" in e)
            if env.get(b"SLURM_JOB_ID") == job_id.encode() and b"SLURM_PROCID" in env:
                pids[int(env[b"SLURM_PROCID"])] = int(proc.name)
        return pids


def newest_checkpoint(log_dir: Path) -> int:
    steps = [
        int(m.group(1))
        for p in log_dir.glob("checkpoint-*.pt")
        if (m := re.search(r"(\d+)", p.name))
    ]
    return max(steps, default=0)


def catches(pid: int, signum: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt")), "0")
    return bool(int(mask, 16) >> (signum - 1) & 1)


def resumed_first_step(slurm: Slurm, name: str, job_id: str, restart: int) -> int:
    steps = slurm.steps(name, job_id, after=f"restart {restart})")
    assert steps, f"no step after restart {restart}:\n{slurm.log(name, job_id)[-3000:]}"
    return steps[0]


def minutes_from_now(slurm: Slurm, job_id: str, extra: int) -> str:
    """A TimeLimit (minutes) `extra` minutes past the job's run time so far, rounded up."""
    run_time = slurm.job(job_id)["RunTime"]  # [D-]HH:MM:SS
    h, m, s = (int(x) for x in run_time.split("-")[-1].split(":"))
    return str(h * 60 + m + (1 if s else 0) + extra)


def scenario_a(slurm: Slurm) -> dict:
    """(a) A 2-rank run writes events and a checkpoint under LOG_ROOT/<job name>."""
    name = "a-run"
    job_id = slurm.submit(name, "--time=10", max_steps=4)
    job = slurm.ended(job_id)
    log, run = slurm.log(name, job_id), slurm.log_dir(name)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log
    assert "on 2 rank(s)" in log and newest_checkpoint(run) == 4, log
    assert list(run.glob("events.out.tfevents.*")) and (run / "config.json").exists()
    assert (run / f"slurm-{job_id}.out").resolve() == (slurm.tmp / f"{name}-{job_id}.out")
    return job


def scenario_b(slurm: Slurm) -> dict:
    """(b) The --signal=B:USR1@300 warning: checkpoint, exit 3, requeue, resume, completion."""
    name = "b-warn"
    job_id = slurm.submit(name, "--time=10")
    slurm.training(name, job_id)
    # The warning goes out once the end is < 300 s (+ up to 60 s) away: at SLURM's next check.
    slurm.scontrol("update", f"JobId={job_id}", f"TimeLimit={minutes_from_now(slurm, job_id, 4)}")
    stopped = slurm.release_requeued(name, job_id, 1, TimeLimit="10")
    job = slurm.ended(job_id)
    log = slurm.log(name, job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", log
    assert "got SIGUSR1" in log and f"requeueing job {job_id}" in log and stopped > 0, log
    assert resumed_first_step(slurm, name, job_id, 1) == stopped + 1
    assert newest_checkpoint(slurm.log_dir(name)) == stopped + 3
    return job


def scenario_c(slurm: Slurm, launcher: str = "srun") -> dict:
    """(c) The time limit without a warning: SIGTERM, SIGCONT, SIGTERM to every rank; one
    request: checkpoint, exit 3, requeue (Reason=TimeLimit), resume. With LAUNCHER=mpirun,
    mpirun kills the ranks after the SIGTERM and exits 1: requeued all the same, resumed from
    the newest checkpoint."""
    name = f"c-limit-{launcher}"
    script = slurm.tmp / "slurm-no-warning.sbatch"  # the script of a user who dropped --signal
    script.write_text(re.sub(r"^#SBATCH --signal=.*\n", "", SCRIPT.read_text(), flags=re.M))
    job_id = slurm.submit(name, "--time=10", script=script, LAUNCHER=launcher)
    slurm.training(name, job_id)
    slurm.scontrol("update", f"JobId={job_id}", "TimeLimit=1")  # ends at SLURM's next check
    stopped = slurm.release_requeued(name, job_id, 1, TimeLimit="10")
    job = slurm.ended(job_id)
    log = slurm.log(name, job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", log
    assert "got SIGTERM" in log and "Reason=TimeLimit" in log, log
    assert "exiting now" not in log and "status 143" not in log, log
    if launcher == "srun":
        assert "stopped by signal 15" in log and stopped > 0, log
    assert resumed_first_step(slurm, name, job_id, 1) == stopped + 1
    return job


def scenario_e(slurm: Slurm) -> dict:
    """(e) scancel: the training checkpoints, the job ends CANCELLED and does not come back."""
    name = "e-cancel"
    job_id = slurm.submit(name, "--time=10")
    slurm.training(name, job_id)
    subprocess.run(["scancel", job_id], env=slurm.env, check=True, timeout=30)
    job = slurm.ended(job_id)
    time.sleep(5)  # a requeue would show at once as PENDING with Restarts=1
    job, log = slurm.job(job_id), slurm.log(name, job_id)
    assert job["JobState"] == "CANCELLED" and job["Restarts"] == "0", log
    assert "was cancelled" in log and "requeueing job" not in log, log
    assert newest_checkpoint(slurm.log_dir(name)) > 0, log
    return job


def scenario_f(slurm: Slurm) -> dict:
    """(f) An admin's `scontrol requeue` mid-run: one job, resumed, no duplicate advised."""
    name = "f-requeue"
    job_id = slurm.submit(name, "--time=10")
    slurm.training(name, job_id)
    slurm.scontrol("requeue", job_id)
    stopped = slurm.release_requeued(name, job_id, 1)
    job = slurm.ended(job_id)
    log = slurm.log(name, job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", log
    assert "already requeued" in log and "sbatch -J" not in log and "failed" not in log, log
    assert resumed_first_step(slurm, name, job_id, 1) == stopped + 1
    same_name = subprocess.run(
        ["squeue", "-h", "-t", "all", "-n", name, "-o", "%i"],
        env=slurm.env,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.split()
    assert same_name == [job_id]
    return job


def usr1_to_rank_0_during_start_up(slurm: Slurm, name: str, job_id: str, after: str) -> float:
    """Once rank 0 has its handler and no step is logged yet, SIGUSR1 to rank 0 only."""

    def rank_0_ready() -> int:
        pids = slurm.rank_pids(job_id)
        return pids.get(0, 0) if len(pids) == 2 and catches(pids.get(0, 0), signal.SIGUSR1) else 0

    pid = slurm.wait(rank_0_ready, 300, "rank 0 with its handler", job_id, name)
    assert not slurm.steps(name, job_id, after), "start-up was over before the signal"
    os.kill(pid, signal.SIGUSR1)
    return time.monotonic()


def scenario_gh(slurm: Slurm) -> dict:
    """(g) SIGUSR1 to rank 0 during start-up (the other rank may be in hvd.init): every rank
    ends, with status 3, within a bound; (h) MAX_REQUEUES=1: requeued once, not twice."""
    name = "g-startup"
    job_id = slurm.submit(name, "--time=10", MAX_REQUEUES="1")
    sent = usr1_to_rank_0_during_start_up(slurm, name, job_id, "restart 0)")
    slurm.wait(lambda: slurm.state(job_id) != "RUNNING", 180, "every rank to end", job_id, name)
    first_stop = time.monotonic() - sent
    slurm.release_requeued(name, job_id, 1)
    sent = usr1_to_rank_0_during_start_up(slurm, name, job_id, "restart 1)")
    job = slurm.ended(job_id, timeout=180)
    second_stop = time.monotonic() - sent
    time.sleep(5)
    job, log = slurm.job(job_id), slurm.log(name, job_id)
    assert log.count("stopped by signal 10") == 2, log
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "3:0", log
    assert job["Restarts"] == "1" and "MAX_REQUEUES=1" in log, log
    return {"stop_seconds": (first_stop, second_stop), **job}


def scenario_d(slurm: Slurm) -> dict:
    """(d) Preemption by a higher-priority partition, without and with GraceTime."""
    names = {"low": "d-nograce", "lowgrace": "d-grace"}
    jobs = {p: slurm.submit(n, "--time=10", f"--partition={p}") for p, n in names.items()}
    for partition, job_id in jobs.items():
        slurm.training(names[partition], job_id)
    high = subprocess.run(
        ["sbatch", "--parsable", "-p", "high", "-J", "d-high", "-n", str(slurm.local.cpus)]
        + [f"--output={slurm.tmp}/d-high-%j.out", "--wrap", "sleep 5"],
        env=slurm.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    stopped = {p: slurm.release_requeued(names[p], j, 1) for p, j in jobs.items()}
    result = {}
    for partition, job_id in jobs.items():
        name = names[partition]
        job = slurm.ended(job_id)
        log = slurm.log(name, job_id)
        assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", log
        assert stopped[partition] > 0, log
        assert resumed_first_step(slurm, name, job_id, 1) == stopped[partition] + 1, log
        result[partition] = (job, log)
    assert "already requeued" in result["low"][1], result["low"][1]
    assert "requeueing job" in result["lowgrace"][1], result["lowgrace"][1]
    assert high.stdout.strip()
    return result


PHASE_1 = {"a": scenario_a, "b": scenario_b, "c": scenario_c, "e": scenario_e}
PHASE_1 |= {"f": scenario_f, "gh": scenario_gh, "c-mpirun": lambda s: scenario_c(s, "mpirun")}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    local_cluster = _load_local_cluster()
    if not local_cluster.installed():
        local_cluster.install(log=lambda line: print(line, file=sys.stderr))
    root = tmp_path_factory.mktemp("slurm")
    local = local_cluster.LocalSlurm(root / "cluster", cpus=12)
    try:
        local.start()
        yield Slurm(local, root)
    finally:
        local.stop()


@pytest.fixture(scope="module")
def phase_1(slurm):
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(PHASE_1))
    futures = {key: pool.submit(run, slurm) for key, run in PHASE_1.items()}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def outcome(phase_1, key: str):
    return phase_1[key].result(timeout=1200)


def test_a_two_rank_job_writes_events_and_a_checkpoint_in_its_run_folder(phase_1):
    outcome(phase_1, "a")


def test_b_time_limit_with_the_usr1_warning_checkpoints_requeues_and_resumes(phase_1):
    outcome(phase_1, "b")


def test_c_time_limit_without_a_warning_checkpoints_requeues_and_resumes(phase_1):
    outcome(phase_1, "c")


def test_c_mpirun_time_limit_without_a_warning_requeues_and_resumes(phase_1):
    outcome(phase_1, "c-mpirun")


def test_e_scancel_ends_the_job_for_good(phase_1):
    outcome(phase_1, "e")


def test_f_an_admin_requeue_resumes_one_job_without_a_duplicate(phase_1):
    outcome(phase_1, "f")


def test_g_h_usr1_during_start_up_ends_every_rank_and_the_requeue_budget_holds(phase_1):
    result = outcome(phase_1, "gh")
    print(f"start-up USR1 to all ranks ended: {result['stop_seconds']} s")
    assert max(result["stop_seconds"]) < 180


def test_d_preemption_with_and_without_grace_time_resumes(slurm, phase_1):
    concurrent.futures.wait(list(phase_1.values()), timeout=1200)  # needs the node to itself
    scenario_d(slurm)
