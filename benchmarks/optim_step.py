"""Time ``optimizer.step()`` on torchvision ResNet-50's parameters (issue 6).

Every optimizer gets its own copy of the 161 parameter tensors (25.6 M values) and the same random
gradients; after warm-up steps it is timed over repeated steps and the median is reported. The
ratios compare every variant of our optimizers (``VARIANTS`` of each class, both code paths), in
the same run, with the fastest torch.optim baseline: LARS and TVLARS against SGD(momentum=0.9,
weight_decay=1e-4), LAMB against AdamW.

    python benchmarks/optim_step.py                       # CPU, 2 threads
    python benchmarks/optim_step.py --threads 8 --repeats 50
    python benchmarks/optim_step.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import SGD, AdamW, Optimizer

from lars.optim import LAMB, LARS, TVLARS

Factory = Callable[[list[Tensor]], Optimizer]
TARGET_RATIO = 2.0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device holding parameters and state (default: cuda when available, else cpu)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of parameters and gradients")
    return parser


def resnet50_tensors(device: torch.device, seed: int) -> tuple[list[Tensor], list[Tensor]]:
    """ResNet-50's parameters and one random gradient per parameter."""
    from torchvision.models import resnet50

    torch.manual_seed(seed)
    params = [p.detach().to(device) for p in resnet50().parameters()]
    grads = [torch.randn_like(p).mul_(1e-2) for p in params]
    return params, grads


def variants() -> dict[str, Factory]:
    """Baselines, then every variant of ours on both paths (names: "CLASS [variant] path")."""
    sgd = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    adamw = dict(lr=1e-3, weight_decay=1e-2)
    factories: dict[str, Factory] = {}
    for path, options in (("fused", dict(fused=True)), ("foreach", dict(foreach=True))):
        factories[f"SGD {path}"] = lambda ps, o=options: SGD(ps, **sgd, **o)
        factories[f"AdamW {path}"] = lambda ps, o=options: AdamW(ps, **adamw, **o)
    factories["SGD loop"] = lambda ps: SGD(ps, **sgd, foreach=False)
    factories["AdamW loop"] = lambda ps: AdamW(ps, **adamw, foreach=False)
    ours = ((LARS, sgd), (TVLARS, dict(sgd, lmbda=1e-3)), (LAMB, adamw))
    for cls, kwargs in ours:
        for variant in cls.VARIANTS:
            for path, foreach in (("foreach", True), ("loop", False)):
                name = f"{cls.__name__} {variant} {path}"
                factories[name] = lambda ps, c=cls, k=kwargs, v=variant, f=foreach: c(
                    ps, **k, variant=v, foreach=f
                )
    return factories


def time_steps(
    factories: dict[str, Factory],
    params: list[Tensor],
    grads: list[Tensor],
    warmup: int,
    repeats: int,
) -> dict[str, float]:
    """Median wall time of one ``step()`` per optimizer, in milliseconds.

    The optimizers take turns, one step each per round, so that a slow patch of the machine
    (other processes, frequency changes) falls on all of them alike and the ratios stay fair.
    """
    sync = torch.cuda.synchronize if params[0].device.type == "cuda" else (lambda: None)
    optimizers: dict[str, Optimizer] = {}
    for name, make in factories.items():
        copies = [p.clone().requires_grad_() for p in params]
        for p, g in zip(copies, grads):
            p.grad = g
        try:
            optimizers[name] = make(copies)
            for _ in range(warmup):
                optimizers[name].step()
        except (RuntimeError, ValueError) as err:  # e.g. no fused kernel for this device
            print(f"{name:24s}      n/a  ({str(err).splitlines()[0][:70]})")
            optimizers.pop(name, None)
    sync()
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(repeats):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    params, grads = resnet50_tensors(device, args.seed)
    numel = sum(p.numel() for p in params)
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
        f"resnet50: {len(params)} tensors, {numel / 1e6:.1f} M values, "
        f"median of {args.repeats} steps after {args.warmup} warm-up steps"
    )
    results = time_steps(variants(), params, grads, args.warmup, args.repeats)
    for name, ms in results.items():
        print(f"{name:24s} {ms:8.2f} ms")
    print()
    baselines = {"LARS": "SGD", "TVLARS": "SGD", "LAMB": "AdamW"}
    for name, ms in results.items():
        kind, *_, path = name.split()
        if kind not in baselines:
            continue
        baseline = baselines[kind]
        fastest = min((n for n in results if n.split()[0] == baseline), key=results.__getitem__)
        same_kind = f"{baseline} {path}"
        ratio = ms / results[fastest]
        verdict = "meets" if ratio <= TARGET_RATIO else "misses"
        print(
            f"{name:24s} / {fastest:13s} = {ratio:5.2f}x ({verdict} <= {TARGET_RATIO}x);"
            f"  / {same_kind:13s} = {ms / results[same_kind]:5.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
