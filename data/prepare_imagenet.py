#!/usr/bin/env python3
"""Turn the official ILSVRC2012 tarballs into train/ and val/ ImageFolder trees.

    python data/prepare_imagenet.py --tars ~/Downloads/ilsvrc2012 --out IMAGENET --workers 8
    python pytorch_imagenet_resnet.py --train-dir IMAGENET/train --val-dir IMAGENET/val ...

Input, all three in --tars (from https://image-net.org/, ILSVRC 2012; Russakovsky et al., IJCV
2015, describe the challenge):

    ILSVRC2012_img_train.tar        a tar of 1000 tars n01440764.tar ..., each holding that class's
                                    JPEGs n01440764_10026.JPEG ... (1,281,167 images, 138 GB)
    ILSVRC2012_img_val.tar          50,000 JPEGs ILSVRC2012_val_00000001.JPEG ... (6.3 GB)
    ILSVRC2012_devkit_t12.tar.gz    ILSVRC2012_devkit_t12/data/meta.mat: a MATLAB struct array
                                    `synsets` with fields ILSVRC2012_ID, WNID, words, gloss,
                                    num_children, ...; the 1000 classes are the entries without
                                    children (ILSVRC2012_ID 1..1000, not in wnid order).
                                    ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt:
                                    the ILSVRC2012_ID of each validation image, one per line, in
                                    file-number order.

Output: OUT/train/<wnid>/<name>.JPEG and OUT/val/<wnid>/ILSVRC2012_val_<n>.JPEG.

The tarballs are read by seeking from member header to member header, one image in memory at a
time. Each training class is written to OUT/train/.<wnid>.partial and renamed when complete, the
validation set to OUT/.val.partial (file by file, each renamed when written) and renamed when all
50,000 are there; a second run skips whatever is complete and finishes an interrupted one.

Every image is checked while it is copied. The training set holds a PNG named .JPEG
(n02105855_2933.JPEG) and a couple of dozen CMYK JPEGs, which some JPEG decoders reject; such files
(anything that is not an RGB or greyscale JPEG) are re-encoded as RGB JPEGs (quality 95) under the
same name, and the summary counts them. Needs Pillow and scipy (scipy.io.loadmat reads meta.mat).
Missing or damaged input stops the tool with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import sys
import tarfile
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
META_MAT = "ILSVRC2012_devkit_t12/data/meta.mat"
GROUND_TRUTH = "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"
_CLASS_TAR = re.compile(r"(n\d{8})\.tar")
_VAL_IMAGE = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")
_VAL_CHUNK = 1000  # validation images per task


class PrepareError(Exception):
    """Missing or damaged input: printed as one line, exit status 2."""


def _damaged(path: Path, error: Exception) -> PrepareError:
    return PrepareError(
        f"{path} is damaged or truncated ({type(error).__name__}: {error}); download it again"
    )


def read_devkit(devkit: Path) -> tuple[dict[int, str], list[int]]:
    """Return ({ILSVRC2012_ID: wnid} for the 1000 classes, validation IDs in image order)."""
    from scipy.io import loadmat

    try:
        with tarfile.open(devkit, "r:gz") as tar:
            files = {}
            for member in tar:
                if member.name.removeprefix("./") in (META_MAT, GROUND_TRUTH) and member.isfile():
                    files[member.name.removeprefix("./")] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise _damaged(devkit, error) from None
    for needed in (META_MAT, GROUND_TRUTH):
        if needed not in files:
            raise PrepareError(f"{devkit} lacks {needed}; download it again")
    try:
        synsets = loadmat(io.BytesIO(files[META_MAT]), squeeze_me=True)["synsets"]
        classes = {
            int(s["ILSVRC2012_ID"]): str(s["WNID"])
            for s in synsets.ravel()
            if int(s["num_children"]) == 0
        }
        ground_truth = [int(line) for line in files[GROUND_TRUTH].decode().split()]
    except Exception as error:  # loadmat and the parsing fail in many ways; all mean "damaged"
        raise PrepareError(
            f"{devkit}: cannot read {META_MAT} or {GROUND_TRUTH} ({type(error).__name__}: {error})"
        ) from None
    unknown = sorted(set(ground_truth) - set(classes))
    if unknown:
        raise PrepareError(
            f"{devkit}: the validation ground truth names unknown class IDs {unknown[:5]}"
        )
    return classes, ground_truth


def normalize_image(data: bytes, origin: str) -> tuple[bytes, str | None]:
    """Return (bytes to write, None) for an RGB or greyscale JPEG, else (RGB JPEG, what it was)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            # Pillow calls a JPEG with a multi-picture (MPF) segment "MPO"; it is still a JPEG.
            if image.format in ("JPEG", "MPO") and image.mode in ("RGB", "L"):
                return data, None
            kind = "CMYK" if image.mode == "CMYK" else f"{image.format} {image.mode}"
            if image.format == "PNG":
                kind = "PNG"
            out = io.BytesIO()
            image.convert("RGB").save(out, "JPEG", quality=95)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise PrepareError(f"{origin} is not a readable image ({error})") from None
    return out.getvalue(), kind


def _scan(path: Path) -> list[tarfile.TarInfo]:
    """The regular members of an uncompressed tar, reading headers only."""
    try:
        with tarfile.open(path, "r:") as tar:
            return [member for member in tar if member.isfile()]
    except (tarfile.TarError, EOFError, OSError) as error:
        raise _damaged(path, error) from None


def _write(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".part")
    partial.write_bytes(data)
    os.replace(partial, path)


def _copy_members(tar_path: Path, members: list[tuple[str, int, int, Path]]) -> Counter:
    """Copy (name, data offset, size, target) members of `tar_path`, normalising each image.

    A target that exists already is skipped (it was renamed into place after a complete write).
    """
    counts: Counter = Counter()
    try:
        tar = tarfile.open(tar_path, "r:")
    except (tarfile.TarError, OSError) as error:
        raise _damaged(tar_path, error) from None
    with tar:
        for name, offset, size, target in members:
            if target.exists():
                continue
            info = tarfile.TarInfo(name)
            info.offset_data, info.size = offset, size
            try:
                with tar.extractfile(info) as file:
                    data = file.read()
            except (tarfile.TarError, EOFError, OSError) as error:
                raise _damaged(tar_path, error) from None
            if len(data) != size:
                raise _damaged(tar_path, EOFError(f"{name} is cut short"))
            data, kind = normalize_image(data, f"{tar_path}:{name}")
            try:
                _write(target, data)
            except OSError as error:
                raise PrepareError(f"cannot write {target} ({error})") from None
            counts["images"] += 1
            if kind:
                counts[kind] += 1
    return counts


def prepare_class(train_tar: Path, wnid: str, offset: int, size: int, out_train: Path) -> Counter:
    """Write one training class (the inner tar at `offset`) to out_train/<wnid>; skip if done."""
    final = out_train / wnid
    if final.is_dir():
        return Counter(skipped_classes=1)
    staging = out_train / f".{wnid}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted run; redo the class
    staging.mkdir(parents=True)
    origin = f"{train_tar}:{wnid}.tar"
    try:
        with tarfile.open(train_tar, "r:") as outer:
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.offset_data, info.size = offset, size
            with (
                outer.extractfile(info) as class_tar,
                tarfile.open(fileobj=class_tar, mode="r:") as inner,
            ):
                members = [(m.name, m.offset_data, m.size) for m in inner if m.isfile()]
    except (tarfile.TarError, EOFError, OSError) as error:
        raise _damaged(Path(origin), error) from None
    if not members:
        raise PrepareError(f"{origin} holds no images; download {train_tar.name} again")
    # The inner tar's offsets are relative to its own start, which lies at `offset` in the outer.
    counts = _copy_members(
        train_tar,
        [
            (name, offset + start, length, staging / Path(name).name)
            for name, start, length in members
        ],
    )
    os.replace(staging, final)
    counts["classes"] += 1
    return counts


def _run(function: Callable, tasks: list[tuple], workers: int, label: str) -> Counter:
    """Run `function(*task)` for every task, in `workers` processes, printing progress."""
    total, step = Counter(), max(1, len(tasks) // 20)
    if not tasks:
        return total
    if workers <= 1:
        results = (function(*task) for task in tasks)
        for done, counts in enumerate(results, 1):
            total.update(counts)
            if done % step == 0 or done == len(tasks):
                print(f"{label}: {done}/{len(tasks)}", flush=True)
        return total
    with ProcessPoolExecutor(workers) as pool:
        try:
            for done, counts in enumerate(pool.map(function, *zip(*tasks)), 1):
                total.update(counts)
                if done % step == 0 or done == len(tasks):
                    print(f"{label}: {done}/{len(tasks)}", flush=True)
        except BaseException:  # stop at the first error instead of finishing the queued tasks
            pool.shutdown(cancel_futures=True)
            raise
    return total


def prepare_train(train_tar: Path, classes: dict[int, str], out: Path, workers: int) -> Counter:
    wnids = {}
    for member in _scan(train_tar):
        match = _CLASS_TAR.fullmatch(Path(member.name).name)
        if not match:
            raise PrepareError(f"{train_tar} holds {member.name!r}, not a class tar n########.tar")
        wnids[match.group(1)] = (member.offset_data, member.size)
    expected = set(classes.values())
    if set(wnids) != expected:
        missing = sorted(expected - set(wnids))
        raise PrepareError(
            f"{train_tar} holds {len(wnids)} class tars, the devkit lists "
            f"{len(expected)} classes (missing: {missing[:5]}); download it again"
        )
    out_train = out / "train"
    out_train.mkdir(parents=True, exist_ok=True)
    todo = [
        (train_tar, w, *wnids[w], out_train) for w in sorted(wnids) if not (out_train / w).is_dir()
    ]
    counts = _run(prepare_class, todo, workers, "train classes")
    counts["skipped_classes"] += len(wnids) - len(todo)
    return counts


def prepare_val(
    val_tar: Path, classes: dict[int, str], ground_truth: list[int], out: Path, workers: int
) -> Counter:
    final, staging = out / "val", out / ".val.partial"
    if final.is_dir():
        return Counter(skipped_val=1)
    members, seen = [], set()
    for member in _scan(val_tar):
        match = _VAL_IMAGE.fullmatch(Path(member.name).name)
        number = int(match.group(1)) if match else 0
        if not 1 <= number <= len(ground_truth):
            raise PrepareError(
                f"{val_tar} holds {member.name!r}, which the devkit's ground truth "
                f"(images 1..{len(ground_truth)}) does not cover"
            )
        wnid = classes[ground_truth[number - 1]]
        target = staging / wnid / Path(member.name).name
        members.append((member.name, member.offset_data, member.size, target))
        seen.add(number)
    if len(seen) != len(ground_truth):
        raise PrepareError(
            f"{val_tar} holds {len(seen)} of the {len(ground_truth)} validation "
            "images; download it again"
        )
    for wnid in set(classes.values()):
        (staging / wnid).mkdir(parents=True, exist_ok=True)
    chunks = [(val_tar, members[i : i + _VAL_CHUNK]) for i in range(0, len(members), _VAL_CHUNK)]
    counts = _run(_copy_members, chunks, workers, "val chunks")
    os.replace(staging, final)
    return counts


def _summary(train: Counter | None, val: Counter | None) -> str:
    parts = []
    if train is not None:
        parts.append(
            f"train: wrote {train['images']} images in {train['classes']} classes, "
            f"skipped {train['skipped_classes']} classes already complete"
        )
    if val is not None:
        parts.append(
            "val: already complete" if val["skipped_val"] else f"val: wrote {val['images']} images"
        )
    converted = (train or Counter()) + (val or Counter())
    kinds = [
        f"{converted[k]} {k}"
        for k in sorted(converted)
        if k not in ("images", "classes", "skipped_classes", "skipped_val")
    ]
    parts.append(f"re-encoded as RGB JPEG: {', '.join(kinds) if kinds else 'none'}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tars",
        type=Path,
        required=True,
        help=f"folder holding {TRAIN_TAR}, {VAL_TAR} and {DEVKIT}",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="where to write train/ and val/ (about 140 GB)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes copying classes in parallel (default: min(8, CPU cores))",
    )
    parser.add_argument(
        "--split",
        choices=("both", "train", "val"),
        default="both",
        help="which split to prepare (default: both)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    try:
        if not args.tars.is_dir():
            raise PrepareError(f"--tars {str(args.tars)!r} is not a directory")
        needed = (
            [DEVKIT]
            + ([TRAIN_TAR] if args.split != "val" else [])
            + ([VAL_TAR] if args.split != "train" else [])
        )
        for name in needed:
            if not (args.tars / name).is_file():
                raise PrepareError(
                    f"{name} not found: put it (from https://image-net.org/, "
                    f"ILSVRC 2012) in {args.tars}"
                )
        classes, ground_truth = read_devkit(args.tars / DEVKIT)
        args.out.mkdir(parents=True, exist_ok=True)
        train = val = None
        if args.split != "val":
            train = prepare_train(args.tars / TRAIN_TAR, classes, args.out, args.workers)
        if args.split != "train":
            val = prepare_val(args.tars / VAL_TAR, classes, ground_truth, args.out, args.workers)
    except PrepareError as error:
        print(f"prepare_imagenet: error: {error}", file=sys.stderr)
        return 2
    print(_summary(train, val))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
