"""CIFAR-10, CIFAR-100 and Tiny ImageNet read straight from the files their authors distribute.

Nothing is downloaded: put the archive (or the folder it extracts to) in `--data-dir`.

    dataset        --data-dir holds either          or the extracted folder
    cifar10        cifar-10-python.tar.gz           cifar-10-batches-py/
    cifar100       cifar-100-python.tar.gz          cifar-100-python/
    tinyimagenet   tiny-imagenet-200.zip            tiny-imagenet-200/

`--data-dir` may also be the extracted folder itself. An extracted folder wins over the archive.

CIFAR (Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009; the layout is
described on https://www.cs.toronto.edu/~kriz/cifar.html). Each file is a Python 2 pickle of a
dict: `b"data"` is a uint8 array of N x 3072, one row per 32x32 image holding the red plane, then
the green, then the blue, each row-major; `b"labels"` (CIFAR-10) or `b"fine_labels"` (CIFAR-100;
`b"coarse_labels"` holds the 20 superclasses, unused here) is a list of N ints. CIFAR-10 trains on
data_batch_1 ... data_batch_5 (10,000 images each) and validates on test_batch; its class names are
`b"label_names"` in batches.meta. CIFAR-100 has train (50,000), test (10,000) and meta with
`b"fine_label_names"`. Pickles are loaded with `encoding="bytes"` (Python 2 `str` becomes bytes) by
an unpickler that only resolves the three numpy globals such a file refers to
(`numpy.core.multiarray._reconstruct`, `numpy.ndarray`, `numpy.dtype`), so a tampered file cannot
run code. The tarball is read in one streaming pass, in memory; nothing is extracted to disk.

Tiny ImageNet (the Stanford CS231n subset of ImageNet, http://cs231n.stanford.edu/): 200 classes
of 64x64 JPEGs. wnids.txt lists the class WordNet ids, words.txt maps ids to descriptions (tab-
separated; it covers all of WordNet), train/<wnid>/images/<wnid>_<k>.JPEG holds 500 images per
class, val/images/val_<k>.JPEG 10,000 images whose classes are given by val/val_annotations.txt
(tab-separated: file name, wnid, then a bounding box). The unlabelled test/ split is ignored. Class
indices follow the sorted wnids, as torchvision's ImageFolder would number train/. From the zip,
images are read on demand; each process (DataLoader workers included) opens its own handle.

Datasets yield (PIL RGB image, int label), or (transform(image), label) when given a transform.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

ARCHIVE_DATASETS = ("cifar10", "cifar100", "tinyimagenet")


@dataclass(frozen=True)
class _Layout:
    title: str
    folder: str
    archive: str
    marker: str  # a file in `folder` (CIFAR: the meta file); tells --data-dir is that folder
    url: str


@dataclass(frozen=True)
class _CifarSpec:
    layout: _Layout
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    label_key: bytes
    names_key: bytes
    num_classes: int


_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_CIFAR = {
    "cifar10": _CifarSpec(
        _Layout(
            "CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz", "batches.meta", _CIFAR_URL
        ),
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        val_files=("test_batch",),
        label_key=b"labels",
        names_key=b"label_names",
        num_classes=10,
    ),
    "cifar100": _CifarSpec(
        _Layout("CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz", "meta", _CIFAR_URL),
        train_files=("train",),
        val_files=("test",),
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        num_classes=100,
    ),
}
_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TINY = _Layout(
    "Tiny ImageNet", "tiny-imagenet-200", "tiny-imagenet-200.zip", "wnids.txt", _TINY_URL
)


def _locate(layout: _Layout, data_dir: str) -> tuple[str, Path]:
    """Return ("folder" or "archive", path) for the dataset under `data_dir`."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir!r} is not a directory")
    if (root / layout.folder).is_dir():
        return "folder", root / layout.folder
    if root.name == layout.folder or (root / layout.marker).is_file():
        return "folder", root
    if (root / layout.archive).is_file():
        return "archive", root / layout.archive
    raise FileNotFoundError(
        f"{layout.title} not found: put {layout.archive} (from {layout.url}) or the folder "
        f"{layout.folder}/ it extracts to in {root}"
    )


# --- CIFAR -----------------------------------------------------------------------------------

# The only globals the original (Python 2, protocol 2) CIFAR pickles name. numpy 2 spells the
# first module numpy._core; both resolve to the same function.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, numbers, bytes and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise _RefusedGlobal(f"refused to load the global {module}.{name}")


def load_cifar_pickle(file: BinaryIO, origin: str) -> dict:
    """Unpickle one CIFAR file safely. Raises ValueError naming `origin` if it is not one."""
    try:
        content = _ArrayUnpickler(file, encoding="bytes").load()
    except _RefusedGlobal as error:
        raise ValueError(f"{origin} is not a CIFAR pickle ({error}); not loading it") from None
    except Exception as error:  # a damaged pickle can fail in many ways; all mean "corrupt"
        raise ValueError(
            f"{origin} is corrupt ({type(error).__name__}: {error}); download it again"
        ) from None
    if not isinstance(content, dict):
        raise ValueError(f"{origin} is not a CIFAR pickle (holds {type(content).__name__})")
    return content


def _cifar_batch(content: dict, spec: _CifarSpec, origin: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (N x 32 x 32 x 3 uint8 images, N int64 labels) from one unpickled batch."""
    data = content.get(b"data")
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3072
    ):
        raise ValueError(f"{origin}: b'data' is not a uint8 N x 3072 array")
    try:
        labels = np.asarray(content[spec.label_key], dtype=np.int64)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{origin}: no integer list {spec.label_key!r}") from None
    if labels.shape != (len(data),):
        raise ValueError(f"{origin}: {len(labels)} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ValueError(f"{origin}: labels outside 0..{spec.num_classes - 1}")
    # Row = three 1024-value planes (R, G, B) of 32 rows x 32 columns; PIL wants height x width x 3.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _cifar_names(content: dict, spec: _CifarSpec, origin: str) -> list[str]:
    names = content.get(spec.names_key)
    if not isinstance(names, list) or len(names) != spec.num_classes:
        raise ValueError(f"{origin}: no list of {spec.num_classes} names {spec.names_key!r}")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _read_cifar_files(kind: str, path: Path, spec: _CifarSpec) -> dict[str, dict]:
    """Unpickle every file the dataset needs, by its name inside the folder."""
    wanted = (*spec.train_files, *spec.val_files, spec.layout.marker)
    layout = spec.layout
    if kind == "folder":
        contents = {}
        for name in wanted:
            file = path / name
            if not file.is_file():
                raise FileNotFoundError(
                    f"{file} is missing: extract {layout.archive} (from "
                    f"{layout.url}) into {path.parent} again"
                )
            with open(file, "rb") as f:
                contents[name] = load_cifar_pickle(f, str(file))
        return contents
    members = {f"{layout.folder}/{name}": name for name in wanted}
    contents = {}
    try:
        with tarfile.open(path, "r|gz") as tar:  # one pass: a gzip stream cannot seek cheaply
            for member in tar:
                name = members.get(member.name.removeprefix("./"))
                if name is not None and member.isfile():
                    contents[name] = load_cifar_pickle(
                        tar.extractfile(member), f"{path}:{member.name}"
                    )
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise ValueError(f"{path} is corrupt or truncated ({error}); download it again") from None
    missing = [f"{layout.folder}/{name}" for name in wanted if name not in contents]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; download it again")
    return contents


@dataclass
class CifarArrays:
    """A CIFAR dataset in memory: images are N x 32 x 32 x 3 uint8 (RGB), labels N int64."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    classes: list[str]


def read_cifar(name: str, data_dir: str) -> CifarArrays:
    """Read "cifar10" or "cifar100" (fine labels) from `data_dir`; see the module docstring."""
    if name not in _CIFAR:
        raise ValueError(f"unknown CIFAR dataset {name!r}; choose cifar10 or cifar100")
    spec = _CIFAR[name]
    kind, path = _locate(spec.layout, data_dir)
    contents = _read_cifar_files(kind, path, spec)

    def split(files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        batches = [_cifar_batch(contents[f], spec, f"{path}/{f}") for f in files]
        return (
            np.ascontiguousarray(np.concatenate([b[0] for b in batches])),
            np.concatenate([b[1] for b in batches]),
        )

    train_images, train_labels = split(spec.train_files)
    val_images, val_labels = split(spec.val_files)
    meta = spec.layout.marker
    classes = _cifar_names(contents[meta], spec, f"{path}/{meta}")
    return CifarArrays(train_images, train_labels, val_images, val_labels, classes)


class CifarImages(Dataset):
    """Images in an N x 32 x 32 x 3 uint8 array; yields (RGB image or transform(image), int)."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        classes: list[str],
        transform: Callable | None = None,
    ) -> None:
        self.images, self.labels, self.classes, self.transform = images, labels, classes, transform
        self.targets = [int(label) for label in labels]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), self.targets[index]


# --- Tiny ImageNet ---------------------------------------------------------------------------


class _Tree:
    """Read-only access to the files of the extracted folder or of the zip, by relative path."""

    def __init__(self, kind: str, path: Path) -> None:
        self.kind, self.path = kind, path
        self.prefix = ""
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1
        if kind == "archive":
            try:
                names = self._archive().namelist()
            except (zipfile.BadZipFile, OSError) as error:
                raise ValueError(
                    f"{path} is not a valid zip file ({error}); download it again"
                ) from None
            markers = sorted((n for n in names if n.rsplit("/", 1)[-1] == "wnids.txt"), key=len)
            if not markers:
                raise ValueError(f"{path} holds no wnids.txt; is it tiny-imagenet-200.zip?")
            self.prefix = markers[0][: -len("wnids.txt")]
            self._listing: dict[str, list[str]] = {}
            for name in names:
                if name.startswith(self.prefix) and not name.endswith("/"):
                    folder, _, base = name[len(self.prefix) :].rpartition("/")
                    self._listing.setdefault(folder, []).append(base)

    def _archive(self) -> zipfile.ZipFile:
        # A zip handle shared across fork() would share one file offset; reopen per process.
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None, "_zip_pid": -1}

    def missing(self, relative: str) -> Exception:
        if self.kind == "folder":
            return FileNotFoundError(
                f"{self.path / relative} is missing: extract "
                f"{_TINY.archive} (from {_TINY.url}) into {self.path.parent}"
                " again"
            )
        return ValueError(f"{self.path} lacks {self.prefix}{relative}; download it again")

    def read(self, relative: str) -> bytes:
        try:
            if self.kind == "folder":
                return (self.path / relative).read_bytes()
            return self._archive().read(self.prefix + relative)
        except (FileNotFoundError, KeyError):
            raise self.missing(relative) from None
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:
            raise ValueError(f"{self.path}: {relative} is corrupt ({error})") from None

    def list_files(self, relative: str) -> list[str]:
        if self.kind == "folder":
            try:
                return sorted(e.name for e in os.scandir(self.path / relative) if e.is_file())
            except (FileNotFoundError, NotADirectoryError):
                raise self.missing(relative + "/") from None
        if relative not in self._listing:
            raise self.missing(relative + "/")
        return sorted(self._listing[relative])


class TinyImageNetImages(Dataset):
    """Tiny ImageNet images listed as (relative path, label); decoded on access to RGB."""

    def __init__(
        self,
        tree: _Tree,
        samples: list[tuple[str, int]],
        classes: list[str],
        descriptions: list[str],
        transform: Callable | None = None,
    ) -> None:
        self.tree, self.samples, self.classes = tree, samples, classes
        self.descriptions, self.transform = descriptions, transform
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        relative, label = self.samples[index]
        with Image.open(io.BytesIO(self.tree.read(relative))) as picture:
            image = picture.convert("RGB")  # a few Tiny ImageNet images are greyscale
        return (self.transform(image) if self.transform else image), label


def _text_lines(tree: _Tree, relative: str) -> list[list[str]]:
    text = tree.read(relative).decode("utf-8")
    return [line.split("\t") for line in text.splitlines() if line.strip()]


def read_tiny_imagenet(data_dir: str) -> tuple[TinyImageNetImages, TinyImageNetImages]:
    """Index Tiny ImageNet's train and val splits (without transforms); see the module docstring."""
    tree = _Tree(*_locate(_TINY, data_dir))
    wnids = [row[0].strip() for row in _text_lines(tree, "wnids.txt")]
    classes = sorted(set(wnids))
    index = {wnid: i for i, wnid in enumerate(classes)}
    try:
        words = {row[0]: row[1].strip() for row in _text_lines(tree, "words.txt") if len(row) > 1}
    except (FileNotFoundError, ValueError):  # descriptions are for people only; wnids suffice
        words = {}
    descriptions = [words.get(wnid, wnid) for wnid in classes]

    train = []
    for wnid in classes:
        folder = f"train/{wnid}/images"
        names = [n for n in tree.list_files(folder) if n.endswith(".JPEG")]
        if not names:
            raise tree.missing(f"{folder}/{wnid}_0.JPEG")
        train += [(f"{folder}/{name}", index[wnid]) for name in names]

    present = set(tree.list_files("val/images"))
    val = []
    for row in _text_lines(tree, "val/val_annotations.txt"):
        if len(row) < 2 or row[1] not in index:
            raise ValueError(
                f"{tree.path}: val/val_annotations.txt has a line {row!r} whose "
                "second field is not a wnid of wnids.txt"
            )
        if row[0] not in present:
            raise tree.missing(f"val/images/{row[0]}")
        val.append((f"val/images/{row[0]}", index[row[1]]))
    return (
        TinyImageNetImages(tree, train, classes, descriptions),
        TinyImageNetImages(tree, val, classes, descriptions),
    )


# --- entry point -----------------------------------------------------------------------------


def build_archive_datasets(
    name: str, data_dir: str, train_transform: Callable | None, val_transform: Callable | None
) -> tuple[Dataset, Dataset, list[str]]:
    """Return (train, val, classes) for `name` in ARCHIVE_DATASETS read from `data_dir`.

    Raises FileNotFoundError (one line naming the missing file and where to put it) or ValueError
    (a corrupt or unexpected file, or an unknown name). CIFAR classes are the names in the meta
    file ("airplane", ...); Tiny ImageNet classes are the sorted wnids, and each dataset's
    `descriptions` holds the matching words.txt entries.
    """
    if name in _CIFAR:
        arrays = read_cifar(name, data_dir)
        train = CifarImages(
            arrays.train_images, arrays.train_labels, arrays.classes, train_transform
        )
        val = CifarImages(arrays.val_images, arrays.val_labels, arrays.classes, val_transform)
        return train, val, arrays.classes
    if name == "tinyimagenet":
        train, val = read_tiny_imagenet(data_dir)
        train.transform, val.transform = train_transform, val_transform
        return train, val, train.classes
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(ARCHIVE_DATASETS)}")
