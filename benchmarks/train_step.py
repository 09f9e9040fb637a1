#!/usr/bin/env python3
"""Our training step vs a bare PyTorch loop, and peak memory against the accumulation factor.

    python benchmarks/train_step.py                       # throughput ratio, CPU
    python benchmarks/train_step.py --memory              # peak RSS for k = 1, 4, 32

Throughput: the same model, optimizer (torch SGD, momentum 0.9), synthetic micro-batch and
thread count; "bare" is forward, loss, backward, step, zero_grad; "ours" is
`lars.step.optimizer_step` (meters on the device, finite check, schedule) with one process.
The two alternate in rounds so that noise from a shared machine hits both; the ratio of their
median images/s is printed (target >= 0.97).

Memory: each k runs in a fresh process (k micro-batches per step, 3 steps) and reports its peak
resident set size; since micro-batches are processed one at a time, the peak should not depend
on k (target: within 5% of each other).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402


def make(model_name: str, image_size: int, batch: int, classes: int = 10):
    from lars.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name, classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, image_size, image_size)
    labels = torch.randint(classes, (batch,))
    return model, optimizer, images, labels


def bare_steps(model, optimizer, images, labels, steps: int) -> float:
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(steps):
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return steps * images.shape[0] / (time.perf_counter() - start)


def our_steps(model, optimizer, images, labels, steps: int, k: int = 1) -> float:
    from lars.distributed import LocalBackend
    from lars.metrics import TrainMeter
    from lars.step import StepContext, optimizer_step

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ctx = StepContext(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=optimizer,
        scheduler=scheduler,
        dist=LocalBackend(),
        device=torch.device("cpu"),
        batches_per_allreduce=k,
    )
    meter, bad = TrainMeter(ctx.device), []
    batches = iter(lambda: (images, labels, []), None)  # the same micro-batch, forever
    start = time.perf_counter()
    for _ in range(steps):
        optimizer_step(ctx, batches, meter, bad)
    meter.read_and_reset(ctx.dist)  # what a log line reads: one copy to the host
    return steps * k * images.shape[0] / (time.perf_counter() - start)


def throughput(args) -> None:
    torch.set_num_threads(args.threads)
    model, optimizer, images, labels = make(args.model, args.image_size, args.batch_size)
    bare_steps(model, optimizer, images, labels, 2)  # warm-up both paths
    our_steps(model, optimizer, images, labels, 2)
    bare, ours = [], []
    for _ in range(args.rounds):
        bare.append(bare_steps(model, optimizer, images, labels, args.steps))
        ours.append(our_steps(model, optimizer, images, labels, args.steps))
    b, o = statistics.median(bare), statistics.median(ours)
    print(
        f"model {args.model} {args.image_size}px, micro-batch {args.batch_size}, "
        f"{args.threads} thread(s), {args.rounds} rounds x {args.steps} steps, torch "
        f"{torch.__version__}"
    )
    print(
        f"bare PyTorch loop   {b:9.1f} images/s (median; min {min(bare):.1f}, max {max(bare):.1f})"
    )
    print(
        f"lars optimizer_step {o:9.1f} images/s (median; min {min(ours):.1f}, max {max(ours):.1f})"
    )
    print(f"ratio ours / bare   {o / b:.3f}   (target >= 0.97)")


def one_memory_run(args) -> None:
    import resource

    torch.set_num_threads(args.threads)
    model, optimizer, images, labels = make(args.model, args.image_size, args.batch_size)
    our_steps(model, optimizer, images, labels, 3, k=args.k)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"k": args.k, "peak_mib": peak_kib / 1024}))


def memory(args) -> None:
    peaks = {}
    for k in (1, 4, 32):
        # glibc keeps freed blocks mapped, so RSS would count what the allocator cached; with a
        # low mmap threshold large tensors are unmapped when freed and RSS follows live memory.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one-memory-run",
                "--k",
                str(k),
                "--model",
                args.model,
                "--image-size",
                str(args.image_size),
                "--batch-size",
                str(args.batch_size),
                "--threads",
                str(args.threads),
            ],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        peaks[k] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
        print(f"--batches-per-allreduce {k:>2}: peak RSS {peaks[k]:8.1f} MiB")
    spread = max(peaks.values()) / min(peaks.values()) - 1
    print(f"largest / smallest peak - 1 = {100 * spread:.2f}%   (target <= 5%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18_small")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="micro-batch, images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory", action="store_true", help="peak memory for k = 1, 4, 32")
    parser.add_argument("--one-memory-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_memory_run:
        one_memory_run(args)
    elif args.memory:
        memory(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
