"""launch/env.sh: the launch defaults, in a shell of their own and through launch/mpirun.sh.

The rule under test (see the file's comments): OMP_NUM_THREADS = cores / ranks per node, and
Open MPI's mpi_yield_when_idle=1 exactly when a rank has fewer than two cores; a value already in
the environment wins; LARS_LAUNCH_DEFAULTS=0 sets nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV_SH = ROOT / "launch" / "env.sh"
NAMES = ("OMP_NUM_THREADS", "OMPI_MCA_mpi_yield_when_idle")


def defaults(ranks: int, cores: int, **env) -> dict[str, str | None]:
    """What lars_launch_env RANKS CORES exports, in a clean bash."""
    script = f"source {ENV_SH} && lars_launch_env {ranks} {cores} && " + " && ".join(
        f'echo "{name}=${{{name}-unset}}"' for name in NAMES
    )
    base = {k: v for k, v in os.environ.items() if k not in NAMES and k != "LARS_LAUNCH_DEFAULTS"}
    out = subprocess.run(
        ["bash", "-c", script], env={**base, **env}, capture_output=True, text=True, check=True
    ).stdout
    values = dict(line.split("=", 1) for line in out.split())
    return {name: None if values[name] == "unset" else values[name] for name in NAMES}


@pytest.mark.parametrize(
    "ranks, cores, threads, yields",
    [
        (1, 2, "2", False),  # one rank, two cores: nothing competes
        (2, 2, "1", True),  # the 2-core VM with two ranks: one core each
        (4, 2, "1", True),  # oversubscribed
        (8, 64, "8", False),  # a GPU node: 8 ranks, 8 cores each
        (16, 16, "1", True),  # CPU training with a rank per core
        (3, 7, "2", False),  # 2 cores and a spare one per rank
    ],
)
def test_threads_per_rank_and_yield_only_without_a_spare_core(ranks, cores, threads, yields):
    assert defaults(ranks, cores) == {
        "OMP_NUM_THREADS": threads,
        "OMPI_MCA_mpi_yield_when_idle": "1" if yields else None,
    }


def test_the_environment_wins_and_the_defaults_can_be_turned_off():
    given = defaults(2, 2, OMP_NUM_THREADS="3", OMPI_MCA_mpi_yield_when_idle="0")
    assert given == {"OMP_NUM_THREADS": "3", "OMPI_MCA_mpi_yield_when_idle": "0"}
    assert defaults(2, 2, LARS_LAUNCH_DEFAULTS="0") == dict.fromkeys(NAMES)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun (launch/setup.sh)")
@pytest.mark.parametrize("np", [1, 2])
def test_mpirun_sh_hands_the_defaults_to_every_rank(np):
    cores = os.cpu_count() or 1
    show = 'echo "$OMP_NUM_THREADS ${OMPI_MCA_mpi_yield_when_idle:-unset}"'
    env = {k: v for k, v in os.environ.items() if k not in NAMES and k != "LARS_LAUNCH_DEFAULTS"}
    env.pop("SLURM_JOB_NUM_NODES", None)
    env.pop("HOSTS", None)
    result = subprocess.run(
        [str(ROOT / "launch" / "mpirun.sh"), str(np), "bash", "-c", show],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    threads = str(max(1, cores // np))
    yields = "1" if 2 * np > cores else "unset"
    assert result.stdout.split("\n")[:np] == [f"{threads} {yields}"] * np
