"""Datasets, samplers and loaders for training and evaluation.

Augmentation is a pure function of (seed, epoch, sample index): before transforming sample i in
epoch e, the worker seeds torch's RNG with a hash of the three. A sample therefore gets the same
crop and flip whichever rank, worker or micro-batch loads it, so runs with different world sizes or
accumulation factors see identical data (the accumulation-exactness test relies on this), and a
resumed run sees what the uninterrupted one would have.

Sharding: training uses torch's DistributedSampler (a seeded permutation per epoch, rank r taking
every W-th index), tagged with the epoch. Validation uses a sampler that gives rank r the indices
r, r+W, r+2W, ... without padding, so that counts summed across ranks are the whole-set metrics
(DistributedSampler pads by repeating samples; pytorch#25162).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from itertools import islice

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate
from torchvision import datasets, transforms

from lars.data.archives import ARCHIVE_DATASETS, build_archive_datasets
from lars.data.fast import IMAGENET_MEAN, IMAGENET_STD, FastImageFolder, loader_settings


def sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# What reading an unreadable, truncated or non-image file raises (PIL, torchvision, the OS).
READ_ERRORS = (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError)


class CorruptSampleError(Exception):
    """A file that cannot be decoded, raised with --strict-data."""


class DataBackendError(ValueError):
    """A data backend that cannot serve this run (not installed, or the wrong kind of data).

    A ValueError, so the trainer reports it like other bad data input: one line, exit status 2.
    """


BACKENDS = ("pytorch", "dali-cpu", "dali-gpu", "synthetic")


def data_backend(cfg) -> str:
    """The backend `cfg` asks for; `synthetic=True` (the --synthetic flag) means "synthetic"."""
    if cfg.backend not in BACKENDS:
        raise DataBackendError(
            f"--data-backend {cfg.backend!r} is not one of {', '.join(BACKENDS)}"
        )
    return "synthetic" if cfg.synthetic else cfg.backend


@dataclass
class BadSample:
    path: str
    error: str


def sample_path(base: Dataset, index: int) -> str:
    samples = getattr(base, "samples", None)
    return samples[index][0] if samples is not None else f"sample {index}"


class RobustDataset(Dataset):
    """Wraps a map-style dataset: seeded augmentation and tolerance of unreadable files.

    `ds[(epoch, i)]` transforms sample i with torch's RNG seeded from (seed, epoch, i). A sample
    that fails to load comes back as a `BadSample` (dropped and counted by `collate_skipping_bad`)
    or, with `strict`, raises CorruptSampleError naming the file.
    """

    def __init__(self, base: Dataset, seed: int, strict: bool = False) -> None:
        self.base, self.seed, self.strict = base, seed, strict

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        torch.manual_seed(sample_seed(self.seed, epoch, index))
        try:
            return self.base[index]
        except READ_ERRORS as error:
            path = sample_path(self.base, index)
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            if self.strict:
                raise CorruptSampleError(
                    f"unreadable file {path}: {message} "
                    "(remove it, or drop --strict-data to skip such files)"
                ) from None
            return BadSample(path, message)


def collate_skipping_bad(batch):
    """(images, labels, bad paths): the good samples stacked, the bad ones listed."""
    good = [sample for sample in batch if not isinstance(sample, BadSample)]
    bad = [sample.path for sample in batch if isinstance(sample, BadSample)]
    if not good:
        return None, None, bad
    images, labels = default_collate(good)
    return images, labels, bad


class SyntheticImages(Dataset):
    """Random images of a fixed shape with random labels (throughput runs; no files read)."""

    def __init__(self, size: int, image_size: int, num_classes: int) -> None:
        self.size, self.image_size, self.num_classes = size, image_size, num_classes

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed(index)
        image = torch.randn(3, self.image_size, self.image_size, generator=generator)
        return image, int(torch.randint(self.num_classes, (1,), generator=generator))


class EpochTaggedSampler(DistributedSampler):
    """DistributedSampler that yields (epoch, index), so the dataset can seed augmentation.

    `skip_samples` drops the first samples of this rank's epoch: a run resumed in the middle of
    an epoch continues with exactly the samples the uninterrupted run would have used next.
    """

    skip_samples = 0

    def __iter__(self):
        epoch = self.epoch
        indices = islice(super().__iter__(), self.skip_samples, None)
        return ((epoch, index) for index in indices)

    def __len__(self) -> int:
        return max(0, super().__len__() - self.skip_samples)


class ShardSampler(Sampler):
    """Rank r of W gets indices r, r+W, ...: every sample exactly once across ranks, no padding."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_transform(image_size: int, min_crop_scale: float, hflip: bool):
    steps = [transforms.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0))]
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


def val_transform(image_size: int, crop_ratio: float = 0.875):
    """Resize the short side to image_size / crop_ratio, then centre-crop image_size: 0.875 is
    the ImageNet standard (224 of 256); 1.0 keeps 32-64 px datasets at their native size."""
    resize = int(round(image_size / crop_ratio))
    return transforms.Compose(
        [
            transforms.Resize(resize),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


@dataclass
class DataConfig:
    train_dir: str | None
    val_dir: str | None
    synthetic: bool
    image_size: int
    min_crop_scale: float
    hflip: bool
    batch_size: int
    val_batch_size: int
    workers: int
    seed: int
    strict_data: bool = False
    fast_jpeg: bool = True  # ImageFolder data through lars.data.fast (uint8 out)
    dataset: str = "imagefolder"  # or sample, synthetic, or one of ARCHIVE_DATASETS
    data_dir: str | None = None
    val_crop_ratio: float = 0.875
    synthetic_size: int = 4096
    synthetic_classes: int = 1000
    # pytorch (DataLoader workers; lars.data.fast for ImageFolder trees) | dali-cpu | dali-gpu
    # (NVIDIA DALI pipelines, lars.data.dali) | synthetic (random tensors, no files read).
    backend: str = "pytorch"
    device_id: int | None = None  # dali-gpu: the CUDA device of this rank (its local rank)


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    train_sampler: EpochTaggedSampler
    num_classes: int
    classes: list[str]
    train_size: int
    val_size: int
    uint8: bool  # batches hold uint8 images for normalize_batch on the device


def image_folder(root: str, role: str, transform=None, fast: dict | None = None):
    """torchvision's ImageFolder over `root` (FastImageFolder with `fast`), or
    FileNotFoundError naming the flag --{role}-dir."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--{role}-dir {root!r} is not a directory")
    try:
        if fast is not None:
            return FastImageFolder(root, **fast)
        return datasets.ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as error:
        raise FileNotFoundError(f"--{role}-dir {root!r}: {error}") from None


def build_datasets(cfg: DataConfig):
    """Return (train, val, classes). Raises FileNotFoundError/ValueError naming the bad input.

    For the DALI backends the datasets are torchvision ImageFolder scans (file lists and labels;
    nothing is decoded here) after a check that DALI is installed.
    """
    backend = data_backend(cfg)
    if backend.startswith("dali"):
        from lars.data import dali

        return dali.build_datasets(cfg)
    if backend == "synthetic":
        train = SyntheticImages(cfg.synthetic_size, cfg.image_size, cfg.synthetic_classes)
        val = SyntheticImages(
            max(cfg.synthetic_size // 8, 1), cfg.image_size, cfg.synthetic_classes
        )
        return train, val, [str(i) for i in range(cfg.synthetic_classes)]
    train_tf = train_transform(cfg.image_size, cfg.min_crop_scale, cfg.hflip)
    val_tf = val_transform(cfg.image_size, cfg.val_crop_ratio)
    if cfg.dataset in ARCHIVE_DATASETS:
        return build_archive_datasets(cfg.dataset, cfg.data_dir, train_tf, val_tf)
    if cfg.fast_jpeg:  # uint8 crops, normalised on the device by normalize_batch
        train = image_folder(
            cfg.train_dir,
            "train",
            fast=dict(
                train=True,
                image_size=cfg.image_size,
                min_crop_scale=cfg.min_crop_scale,
                hflip=cfg.hflip,
            ),
        )
        val = image_folder(
            cfg.val_dir,
            "val",
            fast=dict(train=False, image_size=cfg.image_size, crop_ratio=cfg.val_crop_ratio),
        )
    else:
        train = image_folder(cfg.train_dir, "train", train_tf)
        val = image_folder(cfg.val_dir, "val", val_tf)
    check_same_classes(train, val)
    return train, val, train.classes


def check_same_classes(train, val) -> None:
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train.classes))[:5]
        raise ValueError(
            f"--train-dir and --val-dir have different class folders "
            f"(only in train: {only_train}, only in val: {only_val})"
        )


def build_loaders(
    cfg: DataConfig, rank: int, world_size: int, pin_memory: bool, datasets_=None
) -> Loaders:
    """Loaders over `datasets_` (train, val, classes), or over `build_datasets(cfg)`.

    Dispatches on `data_backend(cfg)`: the DALI backends return `lars.data.dali` loaders with the
    same `Loaders` fields and batches.
    """
    train, val, classes = datasets_ if datasets_ is not None else build_datasets(cfg)
    if data_backend(cfg).startswith("dali"):
        from lars.data import dali

        return dali.build_loaders(cfg, rank, world_size, pin_memory, (train, val, classes))
    train_sampler = EpochTaggedSampler(
        train, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed
    )
    common = dict(**loader_settings(cfg.workers, pin_memory), collate_fn=collate_skipping_bad)
    train_loader = DataLoader(
        RobustDataset(train, cfg.seed, cfg.strict_data),
        batch_size=cfg.batch_size,
        sampler=train_sampler,
        drop_last=True,
        **common,
    )
    val_loader = DataLoader(
        RobustDataset(val, cfg.seed, cfg.strict_data),
        batch_size=cfg.val_batch_size,
        sampler=ShardSampler(len(val), rank, world_size),
        **common,
    )
    return Loaders(
        train_loader,
        val_loader,
        train_sampler,
        len(classes),
        classes,
        len(train),
        len(val),
        uint8=isinstance(train, FastImageFolder),
    )
