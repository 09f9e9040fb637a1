"""The embedded sample dataset: scikit-learn's handwritten digits as an ImageFolder of JPEGs.

scikit-learn ships 1,797 8x8 grey images of the digits 0-9 inside its wheel (the UCI "Optical
Recognition of Handwritten Digits" test set), so the set is real data that needs no download. The
builder upscales each image to 32x32 (bicubic), stores it as an RGB JPEG (quality 95), and splits
each class 80/20 into train/ and val/ with a fixed seed, giving the same files on every machine:

    data/sample/train/<digit>/<index>.JPEG     1,438 images
    data/sample/val/<digit>/<index>.JPEG         359 images

Building is safe when several ranks start at once: one process builds into a temporary folder
under an exclusive file lock and renames it into place; the others wait and then find it done.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

FORMAT_VERSION = 1
IMAGE_SIZE = 32
VAL_FRACTION = 0.2
SPLIT_SEED = 0
_MARKER = "COMPLETE.json"


def default_sample_dir() -> Path:
    """`$LARS_SAMPLE_DIR`, else `<repo>/data/sample` in a checkout, else a per-user cache."""
    if os.environ.get("LARS_SAMPLE_DIR"):
        return Path(os.environ["LARS_SAMPLE_DIR"])
    repo = Path(__file__).resolve().parents[2]
    if (repo / "data").is_dir() and (repo / "pytorch_imagenet_resnet.py").exists():
        return repo / "data" / "sample"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "lars-imagenet" / "sample"


def is_complete(root: Path) -> bool:
    marker = Path(root) / _MARKER
    try:
        return json.loads(marker.read_text()).get("format_version") == FORMAT_VERSION
    except (OSError, ValueError):
        return False


def _write_split(root: Path) -> dict:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target  # float 0..16, int 0..9
    rng = np.random.RandomState(SPLIT_SEED)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        indices = np.flatnonzero(labels == label)
        indices = indices[rng.permutation(len(indices))]
        n_val = int(round(VAL_FRACTION * len(indices)))
        for split, chosen in (("val", indices[:n_val]), ("train", indices[n_val:])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for index in sorted(chosen):
                grey = (images[index] * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
                picture = Image.fromarray(grey, mode="L").resize(
                    (IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC
                )
                picture.convert("RGB").save(folder / f"{index:04d}.JPEG", quality=95)
                counts[split] += 1
    return counts


def build_sample_dataset(root: Path | None = None, quiet: bool = False) -> Path:
    """Build the sample set under `root` (default: `default_sample_dir()`) unless it is complete."""
    root = Path(root) if root is not None else default_sample_dir()
    if is_complete(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    lock_path = root.parent / f".{root.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other ranks wait here, then see it complete
        if is_complete(root):
            return root
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
        try:
            counts = _write_split(staging)
            (staging / _MARKER).write_text(
                json.dumps({"format_version": FORMAT_VERSION, "images": counts}) + "\n"
            )
            if root.exists():  # an incomplete earlier attempt; it holds nothing of the user's
                shutil.rmtree(root)
            os.replace(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if not quiet:
        print(f"built the sample dataset in {root}: {counts['train']} train, {counts['val']} val")
    return root
