#!/usr/bin/env python3
"""A throw-away single-node SLURM (munge + slurmctld + slurmd) for trying launch/slurm.sbatch.

    python launch/slurm/local_cluster.py /tmp/myslurm     # installs (Debian, root), starts, waits
    export SLURM_CONF=/tmp/myslurm/slurm.conf              # then sbatch, squeue, scontrol work
    (Ctrl-C stops every daemon it started)

tests/test_slurm_real.py uses `LocalSlurm` as a fixture. Everything lives in one folder (config,
state, spool, logs); the daemons run in the foreground (-D, -F) as children of this process, so
they are stopped by their PIDs. Facts it relies on (Slurm 22.05, Debian 12):
PID 1 is not systemd, the packages start no service, munged must run as the `munge` user.

Partitions: `debug` (default), and for preemption tests (PreemptType=preempt/partition_prio,
PreemptMode=REQUEUE) `low` (PriorityTier=1, GraceTime=0), `lowgrace` (PriorityTier=1,
GraceTime=GRACE) and `high` (PriorityTier=10). `KillWait` (SIGTERM to SIGKILL) is 30 s.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
GRACE = 20  # seconds of GraceTime in partition `lowgrace`
KILL_WAIT = 30
LOW = "MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE"


def run(*cmd: str, check: bool = True, timeout: float = 60, env=None) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: status {out.returncode}: {out.stderr.strip()}")
    return out.stdout


def installed() -> bool:
    return all(shutil.which(p) for p in ("slurmctld", "slurmd", "munged", "sbatch"))


def install(log=print, lock_wait: float = 1500) -> None:
    """apt-get update + install; another apt-get holding the dpkg lock is waited for."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    deadline = time.monotonic() + lock_wait
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        while True:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            if out.returncode == 0:
                break
            locked = re.search(r"Could not get lock|Unable to lock|is held by", out.stderr)
            if not locked or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(cmd)}: status {out.returncode}: {out.stderr[-800:]}")
            log(f"{cmd[1]}: the dpkg/apt lock is held by another apt-get; retrying in 10 s")
            time.sleep(10)


def node_line(cpus: int | None = None) -> tuple[str, str]:
    """(node name, the NodeName=... line) from `slurmd -C`, addressed through 127.0.0.1;
    `cpus` declares more CPUs than the machine has (SlurmdParameters=config_overrides), so
    several small test jobs run at once."""
    first = run("slurmd", "-C").splitlines()[0]
    fields = dict(item.split("=", 1) for item in first.split())
    if cpus:
        fields.update(CPUs=cpus, Boards=1, SocketsPerBoard=1, CoresPerSocket=cpus, ThreadsPerCore=1)
    name = fields["NodeName"]
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    memory = max(1000, int(fields["RealMemory"]) - 2000)
    line = f"NodeName={name} NodeAddr=127.0.0.1 " + " ".join(f"{k}={fields[k]}" for k in keep)
    return name, f"{line} RealMemory={memory} State=UNKNOWN"


def slurm_conf(root: Path, node: str, line: str) -> str:
    return f"""\
ClusterName=larstest
SlurmctldHost=localhost
AuthType=auth/munge
SlurmUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait={KILL_WAIT}
MinJobAge=600
SchedulerParameters=defer_batch=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.log
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
{line}
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP PriorityTier=10
PartitionName=low Nodes={node} {LOW} GraceTime=0
PartitionName=lowgrace Nodes={node} {LOW} GraceTime={GRACE}
PartitionName=high Nodes={node} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


def munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        out = subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return cred.returncode == 0 and b"Success" in out.stdout


class LocalSlurm:
    """Start with `start()`, stop with `stop()` (idempotent; only what this object started)."""

    def __init__(self, root: Path, cpus: int | None = None) -> None:
        self.root, self.cpus = Path(root), cpus
        self.conf = self.root / "slurm.conf"
        self.daemons: list[tuple[str, subprocess.Popen]] = []
        self.node = ""

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
        return dict(env, SLURM_CONF=str(self.conf))

    def scontrol(self, *args: str, check: bool = True) -> str:
        return run("scontrol", *args, check=check, env=self.env)

    def _spawn(self, name: str, *cmd: str) -> None:
        log = open(self.root / f"{name}.stdout", "ab")  # noqa: SIM115  (closed with the process)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.daemons.append((name, proc))

    def start(self, timeout: float = 90) -> LocalSlurm:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.node, line = node_line(self.cpus)
        self.conf.write_text(slurm_conf(self.root, self.node, line))
        if not munge_works():
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            self._spawn("munged", "runuser", "-u", "munge", "--", "/usr/sbin/munged", "-F")
            self._wait(munge_works, 30, "munged to answer (munge -n | unmunge)")
        self._spawn("slurmctld", "/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf))
        self._wait(lambda: run("sinfo", "-h", check=False, env=self.env), 30, "slurmctld")
        self._spawn("slurmd", "/usr/sbin/slurmd", "-D", "-f", str(self.conf))
        self._wait(self.idle, timeout, f"node {self.node} idle in sinfo")
        return self

    def idle(self) -> bool:
        state = run("sinfo", "-h", "-n", self.node, "-o", "%t", check=False, env=self.env).split()
        return bool(state) and all(s.startswith("idle") for s in state)

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for name, proc in self.daemons:
                if proc.poll() is not None:
                    log = (self.root / f"{name}.log").read_text() if name != "munged" else ""
                    raise RuntimeError(f"{name} exited with {proc.returncode}: {log[-1500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel every job, then end the daemons (slurmd, slurmctld, munged) by their PIDs."""
        if any(name == "slurmctld" and p.poll() is None for name, p in self.daemons):
            deadline = time.monotonic() + KILL_WAIT + 30
            while time.monotonic() < deadline:
                run("scancel", "--user=root", check=False, env=self.env)
                if not run("squeue", "-h", check=False, env=self.env).strip():
                    break
                time.sleep(2)
        for _name, proc in reversed(self.daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self.daemons.clear()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: local_cluster.py FOLDER   (starts a single-node SLURM; Ctrl-C stops it)")
        return 2
    if os.geteuid() != 0:
        print("local_cluster.py: error: needs root (apt-get, munged, slurmd)", file=sys.stderr)
        return 2
    if not installed():
        install()
    cluster = LocalSlurm(Path(argv[0]).resolve())
    try:
        cluster.start()
        print(f"SLURM is up (node {cluster.node}): export SLURM_CONF={cluster.conf}", flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
