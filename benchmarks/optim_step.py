"""Time ``optimizer.step()`` on torchvision ResNet-50's parameters (issue 6).

Every optimizer gets its own copy of the 161 parameter tensors (25.6 M values) and the same random
gradients; after warm-up steps it is timed over repeated steps and the median is reported. The
ratios compare every variant of our optimizers (``VARIANTS`` of each class, on each of ``--paths``:
the fused CPU kernel, the eager multi-tensor ops, the per-tensor loop), in the same run, with the
fastest torch.optim baseline: LARS and TVLARS against SGD(momentum=0.9, weight_decay=1e-4), LAMB
against AdamW. The load average is printed before and after (the machine may be shared).

    python benchmarks/optim_step.py                       # CPU, 2 threads
    python benchmarks/optim_step.py --threads 1 --paths fused,foreach
    python benchmarks/optim_step.py --threads 8 --repeats 50
    python benchmarks/optim_step.py --device cuda --paths foreach,loop
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import SGD, AdamW, Optimizer

from lars.optim import LAMB, LARS, TVLARS, _fused

Factory = Callable[[list[Tensor]], Optimizer]
TARGET_RATIO = 2.0
# Our code paths: the fused CPU kernel (lars.optim._fused), the eager multi-tensor ops, the loop.
PATHS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "loop": dict(foreach=False)}


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
    parser.add_argument(
        "--paths",
        default=",".join(PATHS),
        help=f"our code paths to time, comma-separated (default {','.join(PATHS)})",
    )
    parser.add_argument(
        "--only",
        default="",
        help="time only our classes whose name starts with one of these, comma-separated "
        "(e.g. LARS,LAMB; default: all); the baselines always run",
    )
    return parser


def resnet50_tensors(device: torch.device, seed: int) -> tuple[list[Tensor], list[Tensor]]:
    """ResNet-50's parameters and one random gradient per parameter."""
    from torchvision.models import resnet50

    torch.manual_seed(seed)
    params = [p.detach().to(device) for p in resnet50().parameters()]
    grads = [torch.randn_like(p).mul_(1e-2) for p in params]
    return params, grads


def variants(paths: list[str], only: list[str]) -> dict[str, Factory]:
    """Baselines, then every variant of ours on each path (names: "CLASS [variant] path")."""
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
        if only and not any(cls.__name__.startswith(o) for o in only):
            continue
        for variant in cls.VARIANTS:
            for path in paths:
                name = f"{cls.__name__} {variant} {path}"
                factories[name] = lambda ps, c=cls, k=kwargs, v=variant, o=PATHS[path]: c(
                    ps, **k, variant=v, **o
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


def _load() -> str:
    """The 1, 5 and 15 minute load averages (what `uptime` prints)."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


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
    paths = [p for p in args.paths.split(",") if p]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        print(f"error: --paths: unknown {', '.join(unknown)}; expected {', '.join(PATHS)}")
        return 2
    if "fused" in paths:  # rows labelled fused must not be the fall-back
        reason = "CPU only" if device.type != "cpu" else _fused.unavailable_reason()
        print(f"fused CPU kernel: {'built' if reason is None else 'not timed, ' + reason}")
        if reason is not None:
            paths.remove("fused")
    print(f"load average before: {_load()}")
    factories = variants(paths, [o for o in args.only.split(",") if o])
    results = time_steps(factories, params, grads, args.warmup, args.repeats)
    print(f"load average after:  {_load()}")
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
