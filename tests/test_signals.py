"""lars.signals: real signals to a real process (a child Python that installs the handler the
way pytorch_imagenet_resnet.py does), checked by what the child reports and its exit status.

The child prints one line when its handler is installed, then reports (on stdout, as JSON lines)
what the handler recorded whenever the parent asks through stdin. No test asserts on wall-clock
durations except generous upper bounds on how long an exit may take.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lars.faults import StopAgreement
from lars.signals import BURST_WINDOW, PreemptionHandler, stop_deadline

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
from lars.signals import install_preemption_handler, stop_deadline
handler = install_preemption_handler(deadline=stop_deadline())
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "report":
        print(json.dumps({"received": handler.received, "count": handler.count}), flush=True)
time.sleep(3600)
"""


class Child:
    def __init__(self, **env: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "ready", self.proc.stderr.read()

    def signal(self, *signums: int) -> None:
        for signum in signums:
            os.kill(self.proc.pid, signum)

    def report(self) -> dict:
        self.proc.stdin.write("report\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


@pytest.fixture
def child():
    started: list[Child] = []

    def start(**env: str) -> Child:
        started.append(Child(**env))
        return started[-1]

    yield start
    for each in started:
        each.close()


def test_slurms_sigterm_sigcont_sigterm_burst_is_one_request(child):
    """Slurm 22.05 at a time limit, on preemption and on scancel: SIGTERM, SIGCONT, SIGTERM to
    every task within ~15 ms (measured). The process must survive it, holding one request."""
    proc = child()
    proc.signal(signal.SIGTERM, signal.SIGCONT, signal.SIGTERM)
    state = proc.report()
    assert proc.proc.poll() is None
    assert state["received"] == signal.SIGTERM
    assert 1 <= state["count"] <= 2  # the kernel may merge the two pending SIGTERMs into one


def test_usr1_warning_then_the_time_limits_sigterm_burst_is_still_one_request(child):
    """srun forwards the batch script's USR1, then Slurm's burst may follow within the window."""
    proc = child()
    proc.signal(signal.SIGUSR1)
    assert proc.report()["received"] == signal.SIGUSR1
    proc.signal(signal.SIGTERM, signal.SIGCONT, signal.SIGTERM)
    state = proc.report()
    assert proc.proc.poll() is None and state["received"] == signal.SIGUSR1


def test_a_second_request_after_the_window_exits_at_once(child):
    """A user pressing Ctrl-C again, an operator sending SIGTERM twice: 128 + signal number."""
    proc = child()
    proc.signal(signal.SIGTERM)
    assert proc.report()["received"] == signal.SIGTERM
    time.sleep(BURST_WINDOW + 0.5)
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert "again" in proc.proc.stderr.read()


def test_the_stop_deadline_ends_a_process_that_does_not_stop(child):
    """A peer that died before installing its handler leaves the others waiting (hvd.init);
    the deadline ends them with the signal's status."""
    proc = child(LARS_STOP_DEADLINE="1")
    proc.signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == 128 + signal.SIGUSR1
    assert "LARS_STOP_DEADLINE" in proc.proc.stderr.read()


def test_no_deadline_without_a_request_and_none_when_turned_off(child):
    quiet = child(LARS_STOP_DEADLINE="1")
    off = child(LARS_STOP_DEADLINE="0")
    off.signal(signal.SIGTERM)
    time.sleep(2.5)  # more than the 1 s deadline
    assert quiet.proc.poll() is None and quiet.report()["received"] is None
    assert off.proc.poll() is None and off.report()["received"] == signal.SIGTERM


def test_bad_deadline_is_one_line_naming_the_variable():
    for value in ("soon", "-5", "nan"):
        with pytest.raises(SystemExit) as stopped:
            stop_deadline({"LARS_STOP_DEADLINE": value})
        assert stopped.value.code == 2
    assert stop_deadline({}) > 0 and stop_deadline({"LARS_STOP_DEADLINE": "30"}) == 30


def catches(pid: int, signum: int) -> bool:
    """The process has a handler for signum (the SigCgt mask of /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(
        next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt")), 16
    )
    return bool(mask >> (signum - 1) & 1)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_a_burst_during_start_up_ends_the_run_with_the_requeue_status(tmp_path):
    """The entry script installs the handler before its heavy imports: Slurm's burst while
    torch is still importing is recorded, not fatal, and the first stop agreement ends the run
    with status 3 (the old handler, installed after the imports, died with 143)."""
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", str(ROOT / "pytorch_imagenet_resnet.py")]
        + ["--model", "tinycnn", "--workers", "0", "--threads", "1", "--max-steps", "500"]
        + ["--log-dir", str(tmp_path / "run")],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in proc.stdout:  # -X importtime: one line per module, as each import ends
            lines.append(line)
            if line.rstrip().endswith("| lars.signals"):
                break
        deadline = time.monotonic() + 60
        while not catches(proc.pid, signal.SIGTERM):
            assert time.monotonic() < deadline, "the handler was never installed"
            time.sleep(0.001)
        imported = "".join(lines)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=600)[0]
    finally:
        proc.kill()
    assert "| torch\n" not in imported  # the burst came before torch was imported
    assert proc.returncode == 3, output[-3000:]
    assert "stopped by signal 15" in output


class FakeDist:
    """Sums flags over 'ranks' whose handlers are given, like an allreduce would."""

    def __init__(self, handlers) -> None:
        self.handlers = handlers

    def allreduce_sum_async(self, flag):
        import torch

        total = sum(1 if h.received is not None else 0 for h in self.handlers)
        return torch.tensor([total], dtype=torch.int32)

    def wait(self, handle):
        return handle


def test_a_request_before_the_first_step_stops_before_it_on_every_rank():
    """The first agreement (before step 1) waits for its allreduce: a start-up signal on any
    rank stops all ranks before any step; later ones answer one step late (pipelined)."""
    handlers = [PreemptionHandler(), PreemptionHandler()]
    handlers[1].received = signal.SIGUSR1  # rank 1 was signalled during hvd.init
    stops = [StopAgreement(FakeDist(handlers), h) for h in handlers]
    assert [s.after_step() for s in stops] == [True, True]

    handlers[1].received = None
    stops = [StopAgreement(FakeDist(handlers), h) for h in handlers]
    assert [s.after_step() for s in stops] == [False, False]  # before step 1
    assert [s.after_step() for s in stops] == [False, False]  # after step 1
    handlers[0].received = signal.SIGTERM  # during step 2
    assert [s.after_step() for s in stops] == [False, False]  # after step 2: sent
    assert [s.after_step() for s in stops] == [True, True]  # after step 3: agreed
