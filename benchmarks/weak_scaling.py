#!/usr/bin/env python3
"""Weak scaling on one machine: images/s per rank with 2 ranks x 1 thread vs 1 rank x 1 thread.

    python benchmarks/weak_scaling.py                  # resnet18_small, 32 px, synthetic data

Each configuration runs the real training script (`launch/mpirun.sh N python
pytorch_imagenet_resnet.py --synthetic ...`) with one torch thread per rank and the same
per-rank micro-batch; images/s is read from the script's own log lines (the first interval,
which includes start-up, is dropped). The runs alternate (1, 2, 1, 2, ...) so that a busy
machine affects both; the printed ratio is median(2-rank images/s per rank) / median(1-rank
images/s). Target: >= 0.9 (the allreduce and the coordination cost at most 10%).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RATE = re.compile(r"step \d+/\d+: .* ([0-9.]+) img/s")


def images_per_sec(ranks: int, args, log_root: Path) -> float:
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
        str(log_root / f"np{ranks}"),
        "--backend",
        args.backend,
    ]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    rates = [float(m.group(1)) for m in RATE.finditer(out)][1:]  # drop the start-up interval
    if not rates:
        raise SystemExit(f"no throughput lines in the output:\n{out}")
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
    args = parser.parse_args()
    one, two = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            one.append(images_per_sec(1, args, Path(tmp)))
            two.append(images_per_sec(2, args, Path(tmp)))
    a, b = statistics.median(one), statistics.median(two)
    print(
        f"{args.model} {args.image_size}px, {args.batch_size} images per rank per step, "
        f"1 thread per rank, {args.backend}, {args.rounds} rounds of {args.steps} steps"
    )
    print(f"1 rank : {a:8.1f} images/s per rank  (runs: {', '.join(f'{x:.1f}' for x in one)})")
    print(f"2 ranks: {b:8.1f} images/s per rank  (runs: {', '.join(f'{x:.1f}' for x in two)})")
    print(f"weak-scaling efficiency {b / a:.3f}   (target >= 0.9)")


if __name__ == "__main__":
    main()
