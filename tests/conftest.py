"""Shared helpers: run the training script, in one process or under `mpirun -np N`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pytorch_imagenet_resnet.py"
MPIRUN = ROOT / "launch" / "mpirun.sh"


def distributed_available() -> bool:
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        return False
    return shutil.which("mpirun") is not None


def require_distributed():
    """Skip when Horovod/MPI are missing, or fail when the suite was told they must be there."""
    if distributed_available():
        return
    if os.environ.get("LARS_REQUIRE_DISTRIBUTED") == "1":
        pytest.fail("Horovod or mpirun is missing although LARS_REQUIRE_DISTRIBUTED=1")
    pytest.skip("needs Horovod and mpirun (run launch/setup.sh)")


def run_script(args, np: int = 1, timeout: int = 300, script=SCRIPT, env=None):
    """Run the training script (under mpirun when np > 1); return the CompletedProcess."""
    command = [sys.executable, str(script), *map(str, args)]
    if np > 1:
        command = [str(MPIRUN), str(np), *command]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def check_ok(result) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="session")
def sample_root():
    from lars.data.sample import build_sample_dataset

    return build_sample_dataset(quiet=True)


@pytest.fixture(autouse=True)
def no_distributed_runtime_in_the_test_process():
    """In-process tests must not start Horovod: its singleton MPI_Init would export
    OMPI_COMM_WORLD_* into this process and every subprocess the suite starts later."""
    yield
    if "horovod.torch" in sys.modules:
        import horovod.torch as hvd

        assert not hvd.is_initialized(), "a test initialised Horovod inside pytest"
