"""NVIDIA DALI data backends: `dali-cpu` (DALI's CPU decoders) and `dali-gpu` (nvJPEG and, on
A100/H100-class GPUs, the hardware JPEG decoder), as in NVIDIA's ImageNet training recipes.

DALI is an optional extra (`pip install nvidia-dali-cuda130`, or `LARS_WITH_DALI=1
launch/setup.sh`); without it, asking for these backends raises `DataBackendError` in one line.

What stays as in the `pytorch` backend (lars.data.loaders, lars.data.fast):

- The samples: each epoch, rank r trains on exactly the indices `EpochTaggedSampler` gives it
  (torch's seeded DistributedSampler permutation, `skip_samples` for a resumed epoch), in
  batches of `batch_size` with the incomplete last one dropped. Validation gives rank r the
  indices r, r+W, ... (`ShardSampler`): no padding duplicates, the last batch partial, so counts
  summed across ranks are the whole-set metrics.
- The augmentation: RandomResizedCrop(size, scale=(min_crop_scale, 1), ratio=(3/4, 4/3)) with
  the area drawn uniformly and the aspect ratio log-uniformly (DALI's generator draws them as
  torchvision's `get_params` does), resized with antialiased bilinear filtering; a horizontal flip
  with probability 0.5; validation resizes the short side to round(size / crop_ratio) and cuts
  the centre size x size.
- The output: uint8 (N, 3, size, size) batches (on the GPU for dali-gpu, pinned for dali-cpu on
  a CUDA machine), int64 labels and the list of skipped files, normalised on the device by
  `lars.data.fast.normalize_batch` (`Loaders.uint8`).
- Odd files: DALI reads the format from the bytes, so a PNG named .JPEG, CMYK and greyscale
  JPEGs decode to RGB as PIL's `convert("RGB")` gives them. A file DALI cannot decode but PIL can
  (a GIF) is converted by PIL to PNG bytes before it is fed; a file neither can read is skipped
  and reported (or, with --strict-data, stops the run naming it).

How it differs: the random crop and flip come from DALI's generators (per sample Philox streams
seeded from the pipeline's seed), not from torch's RNG seeded by (seed, epoch, index). This module
seeds each epoch's pipeline from (seed, epoch, rank, first batch), so a run is repeatable with the
same world size and batch size, and a run resumed at an epoch boundary sees the crops of the
uninterrupted one; but a sample's crop changes with the world size, the batch size, and after a
mid-epoch resume (the same samples, other crops). When 10 draws miss, DALI falls back to the
largest in-range crop at a random position, torchvision to the centred one.

The file bytes are read by a thread pool in this process and handed to DALI through
`fn.external_source`, which is what lets a batch hold exactly the sampler's files and lets a bad
file be dropped or converted without ending the pipeline's epoch.
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from lars.data.archives import ARCHIVE_DATASETS
from lars.data.fast import default_workers_per_rank
from lars.data.loaders import (
    READ_ERRORS,
    CorruptSampleError,
    DataBackendError,
    EpochTaggedSampler,
    Loaders,
    ShardSampler,
    check_same_classes,
    image_folder,
)

__all__ = ["DaliLoader", "build_datasets", "build_loaders", "require_dali", "train_graph"]

# Formats DALI's image decoders read (nvImageCodec); anything else PIL converts to PNG first.
DALI_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "PPM", "WEBP", "JPEG2000"}
# nvJPEG's buffers grow to the largest image seen; NVIDIA's ImageNet example preallocates these
# paddings so that the first epochs do not reallocate (DALI's defaults are 16 MiB and 8 MiB).
DEVICE_MEMORY_PADDING = 211025920
HOST_MEMORY_PADDING = 140544512


def require_dali(backend: str):
    """The `nvidia.dali` module, or DataBackendError saying how to install it."""
    try:
        import nvidia.dali as dali
    except ImportError:
        raise DataBackendError(
            f"--data-backend {backend} needs NVIDIA DALI, which is not installed: "
            "pip install nvidia-dali-cuda130 (or LARS_WITH_DALI=1 launch/setup.sh)"
        ) from None
    return dali


def build_datasets(cfg):
    """(train, val, classes) as ImageFolder scans (paths and labels; nothing decoded)."""
    backend = cfg.backend
    require_dali(backend)
    if cfg.dataset in ARCHIVE_DATASETS:
        raise DataBackendError(
            f"--data-backend {backend} reads image files; --dataset {cfg.dataset} is decoded "
            "from its archive: use --data-backend pytorch"
        )
    if backend == "dali-gpu" and not torch.cuda.is_available():
        raise DataBackendError(
            "--data-backend dali-gpu needs a CUDA GPU (none is visible): use dali-cpu"
        )
    train = image_folder(cfg.train_dir, "train")
    val = image_folder(cfg.val_dir, "val")
    check_same_classes(train, val)
    return train, val, train.classes


def train_graph(jpegs, *, size: int, min_crop_scale: float, hflip: bool, gpu: bool):
    """DALI graph: encoded files -> uint8 (3, size, size) random-resized crops, maybe flipped.

    The decoder decodes only the crop's region (fused decode-and-random-crop); on the GPU
    ("mixed": Huffman decoding on the CPU or the hardware decoder, the rest in nvJPEG) the
    resize and flip run on the device too.
    """
    from nvidia.dali import fn, types

    decoder = dict(device="mixed", device_memory_padding=DEVICE_MEMORY_PADDING)
    decoder.update(host_memory_padding=HOST_MEMORY_PADDING)
    images = fn.decoders.image_random_crop(
        jpegs,
        **(decoder if gpu else dict(device="cpu")),
        output_type=types.RGB,
        adjust_orientation=False,  # PIL (the pytorch backend) ignores EXIF orientation too
        random_area=[min_crop_scale, 1.0],
        random_aspect_ratio=[3 / 4, 4 / 3],
        num_attempts=10,
    )
    images = fn.resize(
        images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True
    )
    mirror = fn.random.coin_flip(probability=0.5) if hflip else 0
    return fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW", mirror=mirror)


def val_graph(jpegs, *, size: int, crop_ratio: float, gpu: bool):
    """DALI graph: torchvision's Resize(round(size / crop_ratio)) + CenterCrop(size), exactly.

    The sizes and offsets are computed per image from its header as torchvision computes them:
    the short side becomes r = round(size / crop_ratio), the long one floor(r * long / short);
    the crop starts at round((new - size) / 2) with Python's round-half-to-even, where DALI's own
    centred crop would round 16.5 up, a one-pixel shift.
    """
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    resize_to = int(round(size / crop_ratio))
    shape = fn.peek_image_shape(jpegs, adjust_orientation=False)  # (H, W, C), as PIL sees it
    height, width = shape[0], shape[1]
    short = dmath.min(height, width)
    new_height, new_width = resize_to * height // short, resize_to * width // short
    images = fn.decoders.image(
        jpegs,
        device="mixed" if gpu else "cpu",
        output_type=types.RGB,
        adjust_orientation=False,
    )
    images = fn.resize(
        images,
        size=fn.cast(fn.stack(new_height, new_width), dtype=types.FLOAT),
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    anchor = fn.stack(_half_to_even(new_height - size), _half_to_even(new_width - size))
    images = fn.slice(images, fn.cast(anchor, dtype=types.INT32), [size, size], axes=[0, 1])
    return fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW")


def _half_to_even(excess):
    """round(excess / 2) for an integer DALI node, halves to even (Python's round)."""
    half = excess // 2
    return half + (excess % 2) * (half % 2)


def probe_graph(jpegs, *, gpu: bool):
    from nvidia.dali import fn, types

    return fn.decoders.image(
        jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=False
    )


def pipeline_seed(*parts) -> int:
    """A DALI seed (31 bits) from the parts, e.g. (seed, epoch, rank, first batch)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def pil_png(path: str) -> bytes:
    """The file decoded by PIL, as RGB PNG bytes (lossless) that DALI can decode."""
    with Image.open(path) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def pil_verdict(path: str) -> tuple[str, str]:
    """("ok" | "convert" | "bad", message) from decoding the file with PIL."""
    try:
        with Image.open(path) as image:
            image.load()
            image_format = image.format
    except READ_ERRORS as error:
        return "bad", str(error).splitlines()[0] if str(error) else type(error).__name__
    return ("ok" if image_format in DALI_FORMATS else "convert"), image_format


class DaliLoader:
    """Iterable of (uint8 images (N, 3, H, W), int64 labels, bad paths) for one rank.

    `indices()` gives the epoch's sample indices (a sampler's); `graph(jpegs, gpu=gpu)` the DALI
    operators after the input; `gpu` puts decoding on device `device_id` (else the CPU). Each
    `iter()` builds a pipeline over that epoch's batches, seeded by `seed_parts()`. When DALI
    fails on a batch, the files of the batches in flight are checked with PIL (and, if PIL reads
    them all, each with DALI alone): unreadable ones are skipped from then on, ones only PIL
    reads are converted, and the pipeline is rebuilt from the failed batch.
    """

    def __init__(
        self, dataset, indices, graph, *, batch_size, drop_last, threads, gpu, device_id,
        pin_memory, strict, seed_parts,
    ):  # fmt: skip
        self.samples, self.indices, self.graph, self.gpu = dataset.samples, indices, graph, gpu
        self.batch_size, self.drop_last, self.threads = batch_size, drop_last, threads
        self.device_id, self.pin_memory, self.strict = device_id, pin_memory, strict
        self.seed_parts = seed_parts
        self.bad: dict[str, str] = {}  # path -> why; skipped in every later batch and epoch
        self.convert: set[str] = set()  # paths fed as PIL-made PNG bytes
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="lars-dali-read")
        self.depth = 2  # prefetch queue depth: batches DALI may hold when one fails

    def _batches(self) -> list[list[int]]:
        order = list(self.indices())
        size = self.batch_size
        stop = len(order) - len(order) % size if self.drop_last else len(order)
        return [order[i : i + size] for i in range(0, stop, size)]

    def __len__(self) -> int:
        count = len(list(self.indices()))
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def _read(self, path: str) -> np.ndarray:
        if path in self.convert:
            return np.frombuffer(pil_png(path), dtype=np.uint8)
        return np.fromfile(path, dtype=np.uint8)

    def _pipeline(self, batches: list[list[str]], seed: int):
        from nvidia.dali import Pipeline, fn, types

        def source(iteration: int):
            if iteration >= len(batches):
                raise StopIteration
            return list(self.pool.map(self._read, batches[iteration]))

        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=max(1, self.threads),
            device_id=self.device_id,
            seed=seed,
            prefetch_queue_depth=self.depth,
        )
        with pipe:
            jpegs = fn.external_source(source=source, batch=True, dtype=types.UINT8)
            pipe.set_outputs(self.graph(jpegs, gpu=self.gpu))
        pipe.build()
        return pipe

    def _to_torch(self, output) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        batch = output.as_tensor()
        if self.gpu:
            images = torch.empty(batch.shape(), dtype=torch.uint8, device=f"cuda:{self.device_id}")
            return feed_ndarray(batch, images, cuda_stream=torch.cuda.current_stream())
        images = torch.empty(batch.shape(), dtype=torch.uint8, pin_memory=self.pin_memory)
        return feed_ndarray(batch, images)

    def __iter__(self):
        return self._run(self._batches(), self.seed_parts())

    def _run(self, batches: list[list[int]], seed_parts: tuple):
        start = 0
        while start < len(batches):
            # The batch list from `start`, without the files known to be bad.
            plan = [[i for i in b if self.samples[i][0] not in self.bad] for b in batches[start:]]
            paths = [[self.samples[i][0] for i in b] for b in plan if b]
            pipe = self._pipeline(paths, pipeline_seed(*seed_parts, start)) if paths else None
            failed, done = False, 0  # done: the DALI batches delivered by this pipeline
            for batch, good in zip(batches[start:], plan):
                bad = [self.samples[i][0] for i in batch if self.samples[i][0] in self.bad]
                if not good:  # every file unreadable: an empty batch keeps the ranks in step
                    start += 1
                    yield None, None, bad
                    continue
                try:
                    (output,) = pipe.run()
                except RuntimeError as error:  # DALI's failure on one of the batches in flight
                    suspects = [p for b in paths[done : done + self.depth + 1] for p in b]
                    self._diagnose(suspects, error)
                    failed = True
                    break
                done += 1
                labels = torch.tensor([self.samples[i][1] for i in good], dtype=torch.long)
                start += 1
                yield self._to_torch(output), labels, bad
            del pipe
            if not failed:
                return

    def _diagnose(self, suspects: list[str], error: Exception) -> None:
        """Find the files that made DALI fail; mark them bad or to convert, else re-raise."""
        found = False
        for path, (verdict, message) in zip(suspects, self.pool.map(pil_verdict, suspects)):
            if verdict == "bad":
                self._mark_bad(path, message)
                found = True
            elif verdict == "convert":
                self.convert.add(path)
                found = True
        if found:
            return
        for path in suspects:  # PIL reads them all: which one does DALI reject on its own?
            if not self._dali_decodes(path):
                self.convert.add(path)
                found = True
        if not found:
            raise error

    def _mark_bad(self, path: str, message: str) -> None:
        if self.strict:
            raise CorruptSampleError(
                f"unreadable file {path}: {message} "
                "(remove it, or drop --strict-data to skip such files)"
            )
        self.bad[path] = message

    def _dali_decodes(self, path: str) -> bool:
        from nvidia.dali import Pipeline, fn, types

        data = self._read(path)
        pipe = Pipeline(batch_size=1, num_threads=1, device_id=self.device_id)
        with pipe:
            jpegs = fn.external_source(source=lambda: [data], batch=True, dtype=types.UINT8)
            pipe.set_outputs(probe_graph(jpegs, gpu=self.gpu))
        try:
            pipe.build()
            pipe.run()
        except RuntimeError:
            return False
        return True


def build_loaders(cfg, rank: int, world_size: int, pin_memory: bool, datasets_) -> Loaders:
    """`Loaders` whose train and val are DaliLoaders over `datasets_` (from build_datasets).

    dali-gpu decodes on `cfg.device_id`, or on torch's current CUDA device when that is None
    (the trainer sets it to the local rank's GPU before building the loaders).
    """
    import functools

    train, val, classes = datasets_
    gpu = cfg.backend == "dali-gpu"
    device_id = None
    if gpu:
        device_id = cfg.device_id if cfg.device_id is not None else torch.cuda.current_device()
    threads = cfg.workers if cfg.workers is not None else default_workers_per_rank()
    sampler = EpochTaggedSampler(
        train, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed
    )
    common = dict(threads=threads, gpu=gpu, device_id=device_id, strict=cfg.strict_data)
    common.update(pin_memory=pin_memory and not gpu)
    train_loader = DaliLoader(
        train,
        lambda: (index for _, index in sampler),
        functools.partial(
            train_graph, size=cfg.image_size, min_crop_scale=cfg.min_crop_scale, hflip=cfg.hflip
        ),
        batch_size=cfg.batch_size,
        drop_last=True,
        seed_parts=lambda: (cfg.seed, sampler.epoch, rank, sampler.skip_samples),
        **common,
    )
    shard = ShardSampler(len(val), rank, world_size)
    val_loader = DaliLoader(
        val,
        lambda: iter(shard),
        functools.partial(val_graph, size=cfg.image_size, crop_ratio=cfg.val_crop_ratio),
        batch_size=cfg.val_batch_size,
        drop_last=False,
        seed_parts=lambda: (cfg.seed, "val", rank),
        **common,
    )
    return Loaders(
        train_loader, val_loader, sampler, len(classes), classes, len(train), len(val), uint8=True
    )
