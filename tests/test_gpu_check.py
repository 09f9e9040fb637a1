"""benchmarks/gpu_check.py runs its CPU-safe parts (--cpu-smoke) and marks GPU figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run(*args, timeout=300):
    command = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def table_rows(path: Path) -> list[list[str]]:
    """The data rows of the markdown table: [section, what, figure, ratio]."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


@pytest.mark.slow
def test_cpu_smoke_measures_every_section_and_marks_what_needs_a_gpu(tmp_path):
    out = tmp_path / "table.md"
    result = run("--cpu-smoke", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = table_rows(out)
    assert {row[0] for row in rows} == {"trainer", "loader", "optim", "memory"}
    by_what = {row[1]: row[2] for row in rows}
    # Measured on the CPU: the trainer and the bare loop, our loader, all five optimizers.
    assert (
        " vs " in by_what["tinycnn fp32, batch 8"] and "img/s" in by_what["tinycnn fp32, batch 8"]
    )
    assert by_what["fast, 1 workers"].endswith("img/s")
    for name in ("SGD fused", "AdamW fused", "LARS", "TVLARS", "LAMB"):
        ms, _ = by_what[f"{name} (cpu)"].split(" ms, ")
        assert float(ms) > 0
    # What needs CUDA says so instead of a figure.
    if not torch.cuda.is_available():
        for what in (
            "ResNet-50 bf16",
            "peak, batches-per-allreduce 1",
            "peak, batches-per-allreduce 8",
        ):
            assert by_what[what] == "not measured (no CUDA)"
        assert by_what["dali-gpu"].startswith("not measured")
    ratios = {row[1]: row[3] for row in rows}
    assert ratios["LARS (cpu)"].endswith("x SGD fused") and ratios["LAMB (cpu)"].endswith(
        "x AdamW fused"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_without_a_gpu_the_full_check_refuses_with_status_2(tmp_path):
    result = run("--out", str(tmp_path / "t.md"), timeout=120)
    assert result.returncode == 2
    assert "no CUDA GPU here" in result.stdout and not (tmp_path / "t.md").exists()
