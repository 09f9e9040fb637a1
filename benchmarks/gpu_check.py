#!/usr/bin/env python3
"""The GPU check: what one CUDA GPU does with this project, in a few minutes, in one table.

    python benchmarks/gpu_check.py                    # a CUDA machine: about 5-6 min on an H200
    python benchmarks/gpu_check.py --cpu-smoke        # any machine: tiny sizes, checks it runs
    python benchmarks/gpu_check.py --sections optim,memory --out /tmp/gpu.md

Sections (each prints its figures and ratios; the markdown table goes to --out):

  trainer  ResNet-50 images/s on synthetic data, 1 GPU, through our trainer
           (pytorch_imagenet_resnet.py --synthetic --base-op sgd, its own log lines, the first
           interval dropped) vs a bare PyTorch loop (forward, loss, backward, SGD step on one
           batch already on the GPU), for fp32, bf16, bf16 + channels_last, and that + --compile.
  loader   images/s of the dali-gpu loader (lars.data.dali, decoding with nvJPEG / the hardware
           decoder) on generated 500x375 JPEGs, next to dali-cpu and our own pipeline.
  optim    optimizer.step() time and CUDA kernels launched per step (torch profiler) for LARS,
           TVLARS and LAMB vs torch's fused SGD and AdamW, on ResNet-50's parameters.
  memory   peak GPU memory of lars.step.optimizer_step (bf16) with batches-per-allreduce 1 and 8.

Without CUDA only --cpu-smoke runs (tiny model, few steps, on the CPU): every figure that needs a
GPU is written as "not measured (no CUDA)". The smoke run is what tests/test_gpu_check.py runs.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

NOT_MEASURED = "not measured (no CUDA)"
RATE = re.compile(r"step \d+/\d+: .* ([0-9.]+) img/s")
TRAINER_CONFIGS = {  # name -> (trainer flags, amp dtype, channels_last, compile)
    "fp32": ([], None, False, False),
    "bf16": (["--amp", "bf16"], torch.bfloat16, False, False),
    "bf16 + channels_last": (["--amp", "bf16", "--channels-last"], torch.bfloat16, True, False),
    "bf16 + channels_last + compile": (
        ["--amp", "bf16", "--channels-last", "--compile"],
        torch.bfloat16,
        True,
        True,
    ),
}
SECTIONS = ("trainer", "loader", "optim", "memory")


def sizes(args) -> dict:
    """The workload: ResNet-50 at 224 px on a GPU, or a tiny stand-in for --cpu-smoke."""
    if args.cpu_smoke:
        return dict(model="tinycnn", image=32, batch=8, steps=4, interval=1, images=16)
    return dict(
        model="resnet50", image=224, batch=args.batch_size, steps=40, interval=10, images=512
    )


def trainer_rate(flags: list[str], size: dict, device: str, log_dir: str) -> float:
    """Median images/s of the trainer's log intervals after the first (start-up, compile)."""
    command = [sys.executable, str(ROOT / "pytorch_imagenet_resnet.py"), "--synthetic"]
    command += ["--model", size["model"], "--image-size", str(size["image"])]
    command += ["--batch-size", str(size["batch"]), "--max-steps", str(size["steps"])]
    command += ["--log-interval", str(size["interval"]), "--base-op", "sgd", "--resume", "none"]
    command += ["--log-dir", log_dir, "--progress", "log"]
    command += flags + ([] if device == "cuda" else ["--no-cuda", "--no-channels-last"])
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"trainer exit {result.returncode}: {result.stderr.strip()[-400:]}")
    rates = [float(m.group(1)) for m in RATE.finditer(result.stdout)][1:]
    if not rates:
        raise RuntimeError(f"no img/s lines in the trainer's output:\n{result.stdout[-800:]}")
    return statistics.median(rates)


def bare_rate(size: dict, device: str, amp, channels_last: bool, compile_: bool) -> float:
    """images/s of forward + loss + backward + SGD step on one batch held on the device."""
    from lars.models import build_model

    torch.manual_seed(0)
    model = build_model(size["model"], 1000).to(device)
    images = torch.randn(size["batch"], 3, size["image"], size["image"], device=device)
    labels = torch.randint(1000, (size["batch"],), device=device)
    if channels_last:
        model, images = (
            model.to(memory_format=torch.channels_last),
            images.contiguous(memory_format=torch.channels_last),
        )
    forward = torch.compile(model) if compile_ else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)
    loss_fn = torch.nn.CrossEntropyLoss()

    def steps(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(n):
            with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
                loss = loss_fn(forward(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        sync(device)
        return n * size["batch"] / (time.perf_counter() - start)

    steps(3 if not compile_ else 5)  # warm-up: cuDNN autotuning, compilation
    return steps(size["steps"])


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def trainer_section(args, size, device, rows: list) -> None:
    torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory() as tmp:
        for name, (flags, amp, channels_last, compile_) in TRAINER_CONFIGS.items():
            if args.cpu_smoke and name != "fp32":
                rows.append(("trainer", f"ResNet-50 {name}", NOT_MEASURED, ""))
                continue
            ours = trainer_rate(flags, size, device, f"{tmp}/{len(rows)}")
            bare = bare_rate(size, device, amp, channels_last, compile_)
            label = f"{size['model']} {name}, batch {size['batch']}"
            print(
                f"trainer {label}: ours {ours:.0f} img/s, bare {bare:.0f}, ratio {ours / bare:.3f}"
            )
            rows.append(("trainer", label, f"{ours:.0f} vs {bare:.0f} img/s", f"{ours / bare:.3f}"))


def loader_section(args, size, device, rows: list) -> None:
    import data_loader as bench

    from lars.data.fast import FastImageFolder

    smoke = args.cpu_smoke
    options = argparse.Namespace(
        batch_size=8 if smoke else 64, workers=args.workers, image_size=32 if smoke else 224
    )
    with tempfile.TemporaryDirectory() as root:
        bench.write_images(Path(root), size["images"], 500, 375, 4)
        loaders = {"fast": (bench.loader(FastImageFolder(root, True, options.image_size), options))}
        for name in ("dali-cpu", "dali-gpu"):
            reason = bench.available(name)
            if reason:
                rows.append(("loader", name, f"not measured ({reason})", ""))
            else:
                loaders[name] = bench.DaliEpochs(root, options, gpu=name == "dali-gpu")
        rates = {}
        for name, data_loader in loaders.items():
            bench.measure(data_loader, 1, True, torch.device(device))  # warm-up
            rates[name], _ = bench.measure(data_loader, 2, True, torch.device(device))
    for name, rate in rates.items():
        ratio = f"{rate / rates['fast']:.2f}x fast" if name != "fast" else ""
        print(f"loader {name}: {rate:.0f} img/s ({options.workers} workers/threads) {ratio}")
        rows.append(("loader", f"{name}, {options.workers} workers", f"{rate:.0f} img/s", ratio))


def optimizer_factories() -> dict:
    from torch.optim import SGD, AdamW

    from lars.optim import LAMB, LARS, TVLARS

    sgd = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    adamw = dict(lr=1e-3, weight_decay=1e-2)
    return {
        "SGD fused": lambda ps: SGD(ps, **sgd, fused=True),
        "AdamW fused": lambda ps: AdamW(ps, **adamw, fused=True),
        "LARS": lambda ps: LARS(ps, **sgd),
        "TVLARS": lambda ps: TVLARS(ps, **sgd, lmbda=1e-3),
        "LAMB": lambda ps: LAMB(ps, **adamw),
    }


def step_profile(optimizer, device: str, repeats: int) -> tuple[float, int]:
    """(median step ms, kernels launched in one step; on the CPU: aten ops in one step)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        optimizer.step()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        optimizer.step()
        sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        optimizer.step()
        sync(device)
    if cuda:
        launches = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    else:
        launches = sum(1 for e in prof.events() if e.name.startswith("aten::"))
    return statistics.median(times), launches


def optim_section(args, size, device, rows: list) -> None:
    from lars.models import build_model

    torch.manual_seed(0)
    params = [p.detach().to(device) for p in build_model(size["model"], 1000).parameters()]
    grads = [torch.randn_like(p).mul_(1e-2) for p in params]
    results = {}
    for name, make in optimizer_factories().items():
        copies = [p.clone().requires_grad_() for p in params]
        for p, g in zip(copies, grads):
            p.grad = g
        try:
            results[name] = step_profile(make(copies), device, 2 if args.cpu_smoke else 20)
        except (RuntimeError, ValueError) as error:  # e.g. no fused kernel on this device
            rows.append(("optim", name, f"n/a ({str(error).splitlines()[0][:60]})", ""))
    unit = "kernels" if device == "cuda" else "aten ops (CPU; kernels: " + NOT_MEASURED + ")"
    for name, (ms, launches) in results.items():
        base = {"LARS": "SGD fused", "TVLARS": "SGD fused", "LAMB": "AdamW fused"}.get(name)
        ratio = f"{ms / results[base][0]:.2f}x {base}" if base in results else ""
        print(f"optim {name}: {ms:.2f} ms/step, {launches} {unit} per step {ratio}")
        rows.append(("optim", f"{name} ({device})", f"{ms:.2f} ms, {launches} {unit}", ratio))


def memory_section(args, size, device, rows: list) -> None:
    if device != "cuda":
        for k in (1, 8):
            rows.append(("memory", f"peak, batches-per-allreduce {k}", NOT_MEASURED, ""))
        return
    from train_step import make

    from lars.distributed import LocalBackend
    from lars.metrics import TrainMeter
    from lars.step import StepContext, optimizer_step

    peaks = {}
    for k in (1, 8):
        model, optimizer, images, labels = make(size["model"], size["image"], size["batch"] // 4)
        model, images, labels = model.cuda(), images.cuda(), labels.cuda()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        ctx = StepContext(
            model=model,
            loss_fn=torch.nn.CrossEntropyLoss(),
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
            dist=LocalBackend(),
            device=torch.device("cuda"),
            batches_per_allreduce=k,
            amp_dtype=torch.bfloat16,
        )
        batches = iter(lambda i=images, y=labels: (i, y, []), None)
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            optimizer_step(ctx, batches, TrainMeter(ctx.device), [])
        sync("cuda")
        peaks[k] = torch.cuda.max_memory_allocated() / 2**20
        del model, optimizer, ctx, images, labels
        torch.cuda.empty_cache()
    for k, peak in peaks.items():
        ratio = f"{peak / peaks[1]:.3f}x k=1" if k != 1 else ""
        print(f"memory k={k}: peak {peak:.0f} MiB {ratio}")
        rows.append(("memory", f"peak, batches-per-allreduce {k}", f"{peak:.0f} MiB", ratio))


def write_table(path: Path, rows: list, header: str) -> None:
    lines = [header, "", "| section | what | figure | ratio |", "|---|---|---|---|"]
    lines += [f"| {s} | {w} | {f} | {r} |" for s, w, f, r in rows]
    path.write_text("\n".join(lines) + "\n")
    print(f"table written to {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=",".join(SECTIONS))
    parser.add_argument("--batch-size", type=int, default=256, help="trainer batch (256)")
    parser.add_argument("--workers", type=int, default=8, help="loader workers/threads (8)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.md"), help="markdown table")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.workers = 1
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print(f"no CUDA GPU here: every figure is {NOT_MEASURED}; run --cpu-smoke to check it runs")
        return 2
    device = "cuda" if cuda and not args.cpu_smoke else "cpu"
    size = sizes(args)
    wanted = [s for s in args.sections.split(",") if s]
    if set(wanted) - set(SECTIONS):
        parser.error(f"--sections: unknown {sorted(set(wanted) - set(SECTIONS))}")
    gpu = torch.cuda.get_device_name() if cuda else "no CUDA"
    header = f"GPU check: {gpu}, torch {torch.__version__}, device {device}" + (
        " (--cpu-smoke)" if args.cpu_smoke else ""
    )
    print(header)
    rows: list = []
    started = time.perf_counter()
    sections = dict(trainer=trainer_section, loader=loader_section, optim=optim_section)
    sections.update(memory=memory_section)
    for name in wanted:
        sections[name](args, size, device, rows)
    print(f"total {time.perf_counter() - started:.0f} s")
    write_table(args.out, rows, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
