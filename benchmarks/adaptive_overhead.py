"""Overhead of the adaptive-batch estimators (lars.adaptive) as a fraction of one training step.

Timed with this process's CPU time by default (``--clock process``): on a shared machine other
processes' load stretches wall time but not the CPU this process spends.

One step = k micro-batches of (forward, loss / k, backward) and an SGD step, on the CPU. Each
configuration adds one estimator, active on every step (--test-interval 1, the worst case; with
an interval of T the cost is divided by T). Configurations are interleaved repeat by repeat, so a
change in machine load hits them alike; the median of each is reported against the baseline's.

    python benchmarks/adaptive_overhead.py                      # resnet18_small, 32 px, b=16, k=2
    python benchmarks/adaptive_overhead.py --model tinycnn --repeats 20

Configurations: micro-batch estimator with inner_products none (norm test), copy (exact <g_j,
g-bar>: one gradient copy per micro-batch) and previous (last step's g-bar); per-sample
estimator (torch.func) on --per-sample samples of the step, norm only and with the second pass.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from lars.adaptive import MicroBatchEstimator, PerSampleEstimator
from lars.models import build_model

TARGET = 0.02  # micro-batch estimator: under 2% of a step


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18_small", help="a lars.models name")
    p.add_argument("--image-size", type=int, default=32, help="pixels (default 32)")
    p.add_argument("--micro-batch", type=int, default=16, help="images per micro-batch (16)")
    p.add_argument("--k", type=int, default=2, help="micro-batches per step (default 2)")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per configuration (7)")
    p.add_argument("--per-sample", type=int, default=16, help="per-sample estimator samples (16)")
    p.add_argument("--chunk", type=int, default=8, help="per-sample chunk size (default 8)")
    p.add_argument("--skip-per-sample", action="store_true", help="time the micro-batch ones only")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument(
        "--clock",
        choices=("process", "wall"),
        default="process",
        help="process: this process's CPU time (default; steadier on a shared machine), wall",
    )
    return p


class TimedEstimator(MicroBatchEstimator):
    """The estimator with a stopwatch on its own work (hooks and finish), read inside the same
    steps: a direct measure, free of the step-to-step noise of a shared machine."""

    own = 0.0

    def _hook(self, index):
        inner = super()._hook(index)

        def hook(grad):
            start = time.process_time()
            inner(grad)
            self.own += time.process_time() - start

        return hook

    def finish(self, micro_batch, reduce_sum=None):
        start = time.process_time()
        out = super().finish(micro_batch, reduce_sum)
        self.own += time.process_time() - start
        return out


class Step:
    """One training step with an optional estimator."""

    def __init__(self, args, estimator: str) -> None:
        torch.manual_seed(0)
        self.model = build_model(args.model, num_classes=10)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.loss = nn.CrossEntropyLoss()
        self.args, self.kind = args, estimator
        self.micro = self.per_sample = None
        if estimator.startswith("micro:"):
            mode = estimator.split(":")[1]
            params = list(self.model.parameters())
            self.micro = TimedEstimator(params, inner_products=mode).attach()
        elif estimator.startswith("per-sample:"):
            ip = estimator.endswith("ip")
            self.per_sample = PerSampleEstimator(
                self.model, self.loss, args.per_sample, args.chunk, inner_products=ip
            )

    def __call__(self, batches) -> float:
        clock = time.process_time if self.args.clock == "process" else time.perf_counter
        start = clock()
        k = len(batches)
        self.opt.zero_grad()
        if self.micro is not None:
            self.micro.begin_step(k)
        for x, y in batches:
            (self.loss(self.model(x), y) / k).backward()
        if self.micro is not None:
            self.micro.finish(micro_batch=x.shape[0])
        if self.per_sample is not None:
            self.per_sample.moments(*batches[0])
        self.opt.step()
        return clock() - start


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    # baseline-twin: a second, identical baseline (another model instance): the noise floor
    kinds = ["baseline", "baseline-twin", "micro:none", "micro:copy", "micro:previous"]
    if not args.skip_per_sample:
        kinds += ["per-sample:norm", "per-sample:ip"]
    steps = {kind: Step(args, kind) for kind in kinds}
    shape = (args.micro_batch, 3, args.image_size, args.image_size)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(shape, generator=g), torch.randint(0, 10, shape[:1], generator=g))]
    batches = batches * args.k
    times = {kind: [] for kind in kinds}
    for kind in kinds:  # warm-up (the "previous" mode needs one step for its direction)
        steps[kind](batches), steps[kind](batches)
    load_before = os.getloadavg()
    own = {kind: [] for kind in kinds if kind.startswith("micro")}
    for _ in range(args.repeats):
        for kind in kinds:
            micro = steps[kind].micro
            before = micro.own if micro is not None else 0.0
            times[kind].append(steps[kind](batches))
            if micro is not None:  # the estimator's own share of this very step
                own[kind].append((micro.own - before) / times[kind][-1])
    load_after = os.getloadavg()
    base = statistics.median(times["baseline"])
    print(f"{args.model}, {args.image_size} px, micro-batch {args.micro_batch} x k={args.k}, "
          f"{args.threads} threads, {args.repeats} repeats, {args.clock} time; load average "
          f"{load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'estimator':<18} {'median step (ms)':>17} {'overhead':>9} {'spread':>7}")
    for kind in kinds:
        med = statistics.median(times[kind])
        spread = (max(times[kind]) - min(times[kind])) / med  # how noisy the machine was
        print(f"{kind:<18} {1e3 * med:17.1f} {med / base - 1:9.1%} {spread:7.1%}")
    print("estimator's own time inside its steps (hooks + finish), median share of the step:")
    for kind, shares in own.items():
        print(f"  {kind:<16} {statistics.median(shares):6.2%}")
    norm = statistics.median(own["micro:none"])
    verdict = "within" if norm < TARGET else "above"
    print(
        f"micro-batch estimator, norm test: {norm:.2%} of a step, {verdict} the {TARGET:.0%} target"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
