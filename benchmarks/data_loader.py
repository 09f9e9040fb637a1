"""Images per second per worker: torchvision's ImageFolder pipeline vs lars.data.fast vs DALI.

    python benchmarks/data_loader.py --workers 1     # one DataLoader worker process per pipeline
    python benchmarks/data_loader.py --workers 0     # in-process: the pure per-core cost
    python benchmarks/data_loader.py --data DIR      # an existing ImageFolder tree instead

Pipelines, each through a DataLoader with the same workers and batch size:
  torchvision  ImageFolder + PIL + RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize
  fast         FastImageFolder (uint8 crops) + normalize_batch (on CUDA if present, else the CPU)
  fast-pil     the same with fast_jpeg=False: every file decoded by PIL, no torchvision.io
  dali-cpu     lars.data.dali's training pipeline on DALI's CPU decoders (fused decode and random
               crop, antialiased resize, flip; uint8 out) + normalize_batch; DALI threads =
               --workers (at least 1), files read by this process (when DALI is installed)
  dali-gpu     the same decoding with the "mixed" device (nvJPEG / the hardware JPEG decoder),
               resize and flip on the GPU (when DALI is installed and CUDA is available)

DALI runs threads in this process, not worker processes: its "per worker" figure divides by its
thread count, and the CPU time per image (this process plus the workers, from /proc) is the
comparable per-core figure. `--pipelines` picks some of them (default: every one available).

Without --data it writes N ImageNet-like JPEGs (default 500x375, quality 90: smooth random colour
fields plus per-pixel noise, about 80 KB each) into a temporary folder. After one warm-up epoch
per pipeline it runs --repeats rounds, each timing --epochs epochs of every pipeline, in an order
that alternates between rounds (so drifting load on a shared machine hits all of them), and
prints the median images/s per worker, the CPU time per image summed over the main process and
the workers (user + system, from /proc: on a shared machine the steadier per-core figure), and
for each the median of the per-round ratios to torchvision. Torch runs one thread per process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lars.data.fast import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    FastImageFolder,
    normalize_batch,
)

PIPELINES = ("torchvision", "fast", "fast-pil", "dali-cpu", "dali-gpu")

TARGET_RATIO = 2.0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="an ImageFolder tree to read (default: generate one)")
    parser.add_argument("--images", type=int, default=256, help="images to generate (256)")
    parser.add_argument("--shape", default="500x375", help="generated image WxH (500x375)")
    parser.add_argument("--classes", type=int, default=4, help="class folders generated (4)")
    parser.add_argument(
        "--workers", type=int, default=1, help="DataLoader workers (1; 0 = in-process)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (32)")
    parser.add_argument("--image-size", type=int, default=224, help="crop side in pixels (224)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed per round (2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (3)")
    parser.add_argument(
        "--pipelines",
        default=",".join(PIPELINES),
        help="comma-separated subset of " + ", ".join(PIPELINES) + " (default: all available)",
    )
    return parser


def available(name: str) -> str | None:
    """Why pipeline `name` cannot run here, or None."""
    if name.startswith("dali"):
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            return "NVIDIA DALI is not installed"
    if name == "dali-gpu" and not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


class DaliEpochs:
    """A lars.data.dali.DaliLoader over a fresh shuffle of the whole folder each epoch."""

    def __init__(self, root: str, args, gpu: bool) -> None:
        import functools

        from lars.data.dali import DaliLoader, train_graph

        dataset = datasets.ImageFolder(root)
        self.epoch, self.generator = 0, torch.Generator().manual_seed(0)
        self.loader = DaliLoader(
            dataset,
            lambda: torch.randperm(len(dataset), generator=self.generator).tolist(),
            functools.partial(train_graph, size=args.image_size, min_crop_scale=0.08, hflip=True),
            batch_size=args.batch_size,
            drop_last=False,
            threads=max(1, args.workers),
            gpu=gpu,
            device_id=torch.cuda.current_device() if gpu else None,
            pin_memory=torch.cuda.is_available() and not gpu,
            strict=True,
            seed_parts=lambda: (0, self.epoch),
        )

    def __iter__(self):
        self.epoch += 1
        return ((images, labels) for images, labels, _ in self.loader)


def build_pipelines(root: str, args) -> dict:
    """name -> (iterable of (images, labels), whether its batches are uint8 to normalise)."""
    wanted = [name.strip() for name in args.pipelines.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(PIPELINES))
    if unknown:
        raise SystemExit(f"--pipelines: unknown {', '.join(unknown)} (known: {PIPELINES})")
    pipelines = {}
    for name in wanted:
        reason = available(name)
        if reason:
            print(f"{name}: not measured ({reason})")
        elif name == "torchvision":
            pipelines[name] = (loader(torchvision_dataset(root, args.image_size), args), False)
        elif name == "fast":
            pipelines[name] = (loader(FastImageFolder(root, True, args.image_size), args), True)
        elif name == "fast-pil":
            dataset = FastImageFolder(root, True, args.image_size, fast_jpeg=False)
            pipelines[name] = (loader(dataset, args), True)
        else:
            pipelines[name] = (DaliEpochs(root, args, gpu=name == "dali-gpu"), True)
    return pipelines


def write_images(root: Path, count: int, width: int, height: int, classes: int) -> float:
    """Writes the JPEG tree; returns the mean file size in KB."""
    rng = np.random.default_rng(0)
    sizes = []
    for index in range(count):
        folder = root / f"class{index % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
        noisy = smooth.astype(np.int16) + rng.integers(-12, 13, smooth.shape, dtype=np.int16)
        path = folder / f"img{index:05d}.JPEG"
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
        sizes.append(path.stat().st_size)
    return sum(sizes) / len(sizes) / 1024


def torchvision_dataset(root: str, size: int) -> datasets.ImageFolder:
    return datasets.ImageFolder(
        root,
        transform=transforms.Compose(
            [
                transforms.RandomResizedCrop(size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        ),
    )


def loader(dataset, args) -> DataLoader:
    workers = args.workers
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
        pin_memory=torch.cuda.is_available(),
    )


def worker_cpu_seconds(data_loader: DataLoader) -> float:
    """User + system CPU time of the loader's worker processes so far (Linux /proc)."""
    iterator = getattr(data_loader, "_iterator", None)  # kept alive by persistent_workers
    total = 0.0
    for worker in getattr(iterator, "_workers", []):
        with open(f"/proc/{worker.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def measure(data_loader, epochs: int, normalize: bool, device) -> tuple[float, float]:
    """(images per second of wall time, CPU milliseconds per image in all processes)."""
    count = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    workers_start = worker_cpu_seconds(data_loader)
    for _ in range(epochs):
        for images, _labels in data_loader:
            if normalize:
                images = normalize_batch(images, device)
            else:
                images = images.to(device, non_blocking=True)
            count += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start + worker_cpu_seconds(data_loader) - workers_start
    return count / wall, 1000 * cpu / count


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # workers run one thread anyway; the main process too, per core
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as scratch:
        root = args.data
        if root is None:
            width, height = (int(v) for v in args.shape.lower().split("x"))
            mean_kb = write_images(Path(scratch), args.images, width, height, args.classes)
            root = scratch
            print(f"wrote {args.images} JPEGs {width}x{height} q90, mean {mean_kb:.1f} KB")
        pipelines = build_pipelines(root, args)
        if not pipelines:
            raise SystemExit("no pipeline to measure")
        print(
            f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"Pillow {PIL.__version__}{dali_version()}; workers {args.workers}, batch "
            f"{args.batch_size}, {args.epochs} epochs x {args.repeats} rounds, "
            f"normalize_batch on {device.type}"
        )
        for data_loader, normalize in pipelines.values():  # warm-up: workers, caches
            measure(data_loader, 1, normalize, device)
        names = list(pipelines)
        rates: dict[str, list[float]] = {name: [] for name in names}
        cpu_ms: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(args.repeats):
            order = names if round_index % 2 == 0 else names[::-1]
            for name in order:
                data_loader, normalize = pipelines[name]
                rate, cpu = measure(data_loader, args.epochs, normalize, device)
                rates[name].append(rate / max(1, args.workers))
                cpu_ms[name].append(cpu)
            print(
                f"round {round_index + 1}: "
                + ", ".join(f"{n} {rates[n][-1]:.0f} ({cpu_ms[n][-1]:.2f} ms)" for n in names)
                + "  images/s per worker (CPU ms per image)"
            )
    report(names, rates, cpu_ms)


def dali_version() -> str:
    try:
        import nvidia.dali
    except ImportError:
        return ""
    return f", DALI {nvidia.dali.__version__}"


def report(names: list[str], rates: dict, cpu_ms: dict) -> None:
    base = "torchvision" if "torchvision" in names else names[0]
    print(
        f"\n{'pipeline':12s} {'images/s/worker':>16s} {'vs ' + base:>15s}"
        f" {'CPU ms/image':>13s} {'vs ' + base:>15s}"
    )
    for name in names:
        speedup = paired_ratio(rates[name], rates[base])
        saving = paired_ratio(cpu_ms[base], cpu_ms[name])
        print(
            f"{name:12s} {statistics.median(rates[name]):16.0f} {speedup:14.2f}x"
            f" {statistics.median(cpu_ms[name]):13.2f} {saving:14.2f}x"
        )
    for fast, slow in (("fast", "torchvision"), ("dali-cpu", "torchvision"), ("dali-cpu", "fast")):
        if fast not in names or slow not in names:
            continue
        wall = paired_ratio(rates[fast], rates[slow])
        cpu = paired_ratio(cpu_ms[slow], cpu_ms[fast])
        target = (
            f" (target >= {TARGET_RATIO:.1f}x)" if (fast, slow) == ("fast", "torchvision") else ""
        )
        print(
            f"{fast}/{slow}: {wall:.2f}x images/s per worker, {cpu:.2f}x CPU time per image"
            + target
        )


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median over rounds of the per-round ratio (drift in machine load cancels within a round)."""
    return statistics.median(n / d for n, d in zip(numerators, denominators))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
