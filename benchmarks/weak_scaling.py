#!/usr/bin/env python3
"""Weak scaling on one machine: images/s per rank with 2 ranks x 1 thread vs 1 rank x 1 thread.

    python benchmarks/weak_scaling.py                          # before vs after, Horovod
    python benchmarks/weak_scaling.py --backend torch
    python benchmarks/weak_scaling.py --variants before,yield,cycle20,both,after

Each configuration runs the real training script (`launch/mpirun.sh N python
pytorch_imagenet_resnet.py --synthetic ...`) with one torch thread per rank and the same
per-rank micro-batch; images/s is read from the script's own log lines (the first interval,
which includes start-up, is dropped). Variants are launch environments:

  before   LARS_LAUNCH_DEFAULTS=0: none of launch/env.sh's defaults (the launcher as it was)
  after    launch/env.sh's defaults (what launch/mpirun.sh does now)
  yield    before + OMPI_MCA_mpi_yield_when_idle=1 (Open MPI yields the core while it waits)
  cycle20  before + HOROVOD_CYCLE_TIME=20 (Horovod's background thread wakes every 20 ms, not 1)
  both     before + both settings

The runs alternate (variants in turn, 1 rank then 2 ranks, the order reversed every other
round) so that a busy machine affects all of them; the printed efficiency is median(2-rank
images/s per rank) / median(1-rank images/s) per variant. Target: >= 0.95 with one core per
rank. The load average before and after is printed: on a shared machine, quote it.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RATE = re.compile(r"step \d+/\d+: .* ([0-9.]+) img/s")
TARGET = 0.95
BEFORE = {"LARS_LAUNCH_DEFAULTS": "0"}
YIELD = {"OMPI_MCA_mpi_yield_when_idle": "1"}
CYCLE20 = {"HOROVOD_CYCLE_TIME": "20"}
VARIANTS = {
    "before": BEFORE,
    "after": {},
    "yield": {**BEFORE, **YIELD},
    "cycle20": {**BEFORE, **CYCLE20},
    "both": {**BEFORE, **YIELD, **CYCLE20},
}
# Settings that a caller's environment must not smuggle into a variant.
CLEARED = ("LARS_LAUNCH_DEFAULTS", "OMPI_MCA_mpi_yield_when_idle", "HOROVOD_CYCLE_TIME")


def images_per_sec(ranks: int, variant: str, args, log_root: Path) -> float:
    command = [
        str(ROOT / "launch" / "mpirun.sh"),
        str(ranks),
        sys.executable,
        str(ROOT / "pytorch_imagenet_resnet.py"),
        "--synthetic",
        "--model",
        args.model,
        "--image-size",
        str(args.image_size),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        "1",
        "--workers",
        "0",
        "--max-steps",
        str(args.steps),
        "--log-interval",
        str(args.log_interval),
        "--resume",
        "none",
        "--log-dir",
        str(log_root / f"{variant}-np{ranks}"),
        "--backend",
        args.backend,
    ]
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(VARIANTS[variant])
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"exit {result.returncode}: {' '.join(command)}\n{result.stderr[-3000:]}")
    rates = [float(m.group(1)) for m in RATE.finditer(result.stdout)][1:]  # drop start-up
    if not rates:
        raise SystemExit(f"no throughput lines in the output:\n{result.stdout}")
    return statistics.median(rates) / ranks  # the log reports the global images/s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18_small")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank, images")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-interval", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default="horovod", choices=("horovod", "torch"))
    parser.add_argument(
        "--variants", default="before,after", help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}")
    load_before = os.getloadavg()
    runs = {(v, n): [] for v in variants for n in (1, 2)}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            order = [(v, n) for v in variants for n in (1, 2)]
            for variant, ranks in order if round_index % 2 == 0 else order[::-1]:
                runs[variant, ranks].append(images_per_sec(ranks, variant, args, Path(tmp)))
    load_after = os.getloadavg()
    print(
        f"{args.model} {args.image_size}px, {args.batch_size} images per rank per step, "
        f"1 thread per rank, {args.backend}, {args.rounds} rounds of {args.steps} steps, "
        f"{os.cpu_count()} cores; load average before {load_before[0]:.2f} "
        f"(5 min {load_before[1]:.2f}), after {load_after[0]:.2f} (5 min {load_after[1]:.2f})"
    )
    for variant in variants:
        one, two = runs[variant, 1], runs[variant, 2]
        a, b = statistics.median(one), statistics.median(two)
        print(
            f"{variant:8s} 1 rank {a:6.1f}  2 ranks {b:6.1f} images/s per rank  "
            f"efficiency {b / a:.3f} (target >= {TARGET})   runs: 1 rank "
            f"{', '.join(f'{x:.1f}' for x in one)}; 2 ranks {', '.join(f'{x:.1f}' for x in two)}"
        )


if __name__ == "__main__":
    main()
