"""CIFAR-10/100 and Tiny ImageNet read from tiny files written in the layouts their authors ship.

The CIFAR files are written the way the originals were: Python 2 cPickle protocol 2, where every
string is a byte string (SHORT_BINSTRING/BINSTRING) and arrays refer to
numpy.core.multiarray._reconstruct. Expected pixels are computed from the documented layout (three
1024-value colour planes of 32 rows each) with plain slicing, not with the reader's reshape.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from lars.data.archives import build_archive_datasets, load_cifar_pickle

CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it: str and bytes alike become byte strings."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_byte_string(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_byte_string
    dispatch[str] = save_byte_string

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", None) == "_reconstruct":  # numpy 1.x's module name
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    dispatch[type(len)] = save_global


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def expected_image(row: np.ndarray) -> np.ndarray:
    image = np.zeros((32, 32, 3), np.uint8)
    for channel in range(3):
        for r in range(32):
            start = channel * 1024 + r * 32
            image[r, :, channel] = row[start : start + 32]
    return image


def write_cifar(data_dir: Path, name: str, tarball: bool) -> dict:
    """Write a tiny CIFAR folder (or its .tar.gz) in the real layout; return what it holds."""
    rng = np.random.default_rng(1)
    if name == "cifar10":
        folder, archive = "cifar-10-batches-py", "cifar-10-python.tar.gz"
        train_files, val_files, key, classes = (
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
            b"labels",
            CIFAR10_NAMES,
        )
        meta = {
            b"num_cases_per_batch": 3,
            b"label_names": [c.encode() for c in classes],
            b"num_vis": 3072,
        }
        meta_file = "batches.meta"
    else:
        folder, archive = "cifar-100-python", "cifar-100-python.tar.gz"
        train_files, val_files, key = ["train"], ["test"], b"fine_labels"
        classes = [f"fine{i:02d}" for i in range(100)]
        meta = {
            b"fine_label_names": [c.encode() for c in classes],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        }
        meta_file = "meta"
    files, expected = {meta_file: meta}, {"classes": classes}
    for split, names in (("train", train_files), ("val", val_files)):
        rows, labels = [], []
        for file in names:
            n = 3 if name == "cifar10" else 7
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            batch_labels = [int(x) for x in rng.integers(0, len(classes), n)]
            batch = {
                b"batch_label": f"{file} of the test".encode(),
                key: batch_labels,
                b"data": data,
                b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            }
            if name == "cifar100":  # coarse labels differ from fine ones: the reader must pick fine
                batch[b"coarse_labels"] = [(label + 7) % 20 for label in batch_labels]
            files[file] = batch
            rows.append(data)
            labels += batch_labels
        expected[split] = (np.concatenate(rows), labels)
    root = data_dir / folder
    root.mkdir(parents=True)
    for file, content in files.items():
        (root / file).write_bytes(py2_pickle(content))
    (root / "readme.html").write_text("<html></html>")
    if tarball:
        with tarfile.open(data_dir / archive, "w:gz") as tar:
            tar.add(root, arcname=folder)
        for file in root.iterdir():
            file.unlink()
        root.rmdir()
    return expected


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("tarball", [False, True], ids=["folder", "tarball"])
def test_cifar_round_trips_pixels_labels_and_names(tmp_path, name, tarball):
    expected = write_cifar(tmp_path, name, tarball)
    train, val, classes = build_archive_datasets(name, str(tmp_path), None, None)
    assert classes == expected["classes"]
    for dataset, split in ((train, "train"), (val, "val")):
        rows, labels = expected[split]
        assert len(dataset) == len(rows)
        for i in range(len(rows)):
            image, label = dataset[i]
            assert isinstance(image, Image.Image) and image.mode == "RGB"
            assert image.size == (32, 32)
            np.testing.assert_array_equal(np.asarray(image), expected_image(rows[i]))
            assert label == labels[i] and type(label) is int


def test_extracted_folder_can_be_the_data_dir_itself(tmp_path):
    expected = write_cifar(tmp_path, "cifar10", tarball=False)
    train, val, _ = build_archive_datasets(
        "cifar10", str(tmp_path / "cifar-10-batches-py"), None, None
    )
    assert [train[i][1] for i in range(len(train))] == expected["train"][1]


def test_transforms_apply(tmp_path):
    write_cifar(tmp_path, "cifar10", tarball=False)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(24), transforms.ToTensor()])
    train, val, _ = build_archive_datasets(
        "cifar10", str(tmp_path), train_tf, transforms.ToTensor()
    )
    assert train[0][0].shape == (3, 24, 24)
    assert val[0][0].shape == (3, 32, 32) and val[0][0].dtype == torch.float32


def test_missing_dataset_names_the_archive_and_the_place(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        build_archive_datasets("cifar100", str(tmp_path), None, None)
    message = str(error.value)
    assert "cifar-100-python.tar.gz" in message and "cifar-100-python/" in message
    assert str(tmp_path) in message and "\n" not in message


def test_missing_batch_file_is_named(tmp_path):
    write_cifar(tmp_path, "cifar10", tarball=False)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3 is missing"):
        build_archive_datasets("cifar10", str(tmp_path), None, None)


def test_corrupt_or_truncated_tarball_is_a_value_error(tmp_path):
    write_cifar(tmp_path, "cifar10", tarball=True)
    archive = tmp_path / "cifar-10-python.tar.gz"
    whole = archive.read_bytes()
    archive.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="cifar-10-python.tar.gz"):
        build_archive_datasets("cifar10", str(tmp_path), None, None)
    archive.write_bytes(b"not a gzip file at all")
    with pytest.raises(ValueError, match="corrupt"):
        build_archive_datasets("cifar10", str(tmp_path), None, None)


def test_wrong_shape_or_labels_are_value_errors(tmp_path):
    write_cifar(tmp_path, "cifar10", tarball=False)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(py2_pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match="N x 3072"):
        build_archive_datasets("cifar10", str(tmp_path), None, None)
    batch.write_bytes(py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}))
    with pytest.raises(ValueError, match="labels outside"):
        build_archive_datasets("cifar10", str(tmp_path), None, None)


class _Exploit:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("python2", [True, False], ids=["python2-style", "highest-protocol"])
def test_malicious_pickle_is_refused_without_running(tmp_path, python2):
    write_cifar(tmp_path, "cifar10", tarball=False)
    marker = tmp_path / "exploited"
    content = {b"data": _Exploit(f"touch {marker}"), b"labels": []}
    payload = py2_pickle(content) if python2 else pickle.dumps(content, protocol=5)
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(payload)
    with pytest.raises(ValueError, match=r"refused to load the global (posix|os|nt)\.system"):
        build_archive_datasets("cifar10", str(tmp_path), None, None)
    assert not marker.exists()
    # The payload is real: an ordinary unpickler runs it.
    pickle.loads(payload)
    assert marker.exists()


def test_builtins_are_refused_too():
    payload = pickle.dumps(eval, protocol=2)  # a global from builtins
    with pytest.raises(ValueError, match=r"(__builtin__|builtins)\.eval"):
        load_cifar_pickle(io.BytesIO(payload), "x")


# --- Tiny ImageNet -----------------------------------------------------------------------------

TINY_WNIDS = ["n02124075", "n01443537", "n09246464"]  # wnids.txt is not in sorted order
TINY_COLOURS = {"n01443537": (220, 30, 30), "n02124075": (30, 200, 40), "n09246464": (40, 40, 210)}
TINY_VAL = ["n02124075", "n01443537", "n09246464", "n09246464", "n01443537", "n02124075"]


def _jpeg(colour, grey: bool = False) -> bytes:
    image = Image.new("RGB", (64, 64), colour)
    if grey:
        image = image.convert("L")
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95)
    return out.getvalue()


def write_tiny(data_dir: Path, as_zip: bool) -> None:
    files = {
        "wnids.txt": "".join(f"{w}\n" for w in TINY_WNIDS).encode(),
        "words.txt": b"n00001740\tentity\nn01443537\tgoldfish, Carassius auratus\n"
        b"n02124075\tEgyptian cat\nn09246464\tcliff, drop, drop-off\n",
        "val/val_annotations.txt": "".join(
            f"val_{i}.JPEG\t{w}\t0\t0\t63\t63\n" for i, w in enumerate(TINY_VAL)
        ).encode(),
        "test/images/test_0.JPEG": _jpeg((1, 2, 3)),
    }
    for wnid in TINY_WNIDS:
        files[f"train/{wnid}/{wnid}_boxes.txt"] = f"{wnid}_0.JPEG\t0\t0\t63\t63\n".encode()
        for k in range(2):  # the second image of the goldfish class is greyscale
            grey = wnid == "n01443537" and k == 1
            files[f"train/{wnid}/images/{wnid}_{k}.JPEG"] = _jpeg(TINY_COLOURS[wnid], grey)
    for i, wnid in enumerate(TINY_VAL):
        files[f"val/images/val_{i}.JPEG"] = _jpeg(TINY_COLOURS[wnid])
    if as_zip:
        with zipfile.ZipFile(data_dir / "tiny-imagenet-200.zip", "w") as archive:
            archive.writestr("tiny-imagenet-200/", b"")
            for name, data in files.items():
                archive.writestr(f"tiny-imagenet-200/{name}", data)
        return
    for name, data in files.items():
        path = data_dir / "tiny-imagenet-200" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _colour_of(image: Image.Image) -> tuple:
    return tuple(np.asarray(image).reshape(-1, 3).mean(axis=0))


def _assert_close(colour, expected, grey=False):
    if grey:  # ITU-R 601 luma of the colour, repeated in R, G and B
        r, g, b = expected
        expected = (r * 0.299 + g * 0.587 + b * 0.114,) * 3
    assert np.allclose(colour, expected, atol=6), (colour, expected)


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_tiny_imagenet_samples_labels_and_names(tmp_path, as_zip):
    write_tiny(tmp_path, as_zip)
    train, val, classes = build_archive_datasets("tinyimagenet", str(tmp_path), None, None)
    assert classes == sorted(TINY_WNIDS)
    assert train.descriptions == [
        "goldfish, Carassius auratus",
        "Egyptian cat",
        "cliff, drop, drop-off",
    ]
    assert len(train) == 6 and len(val) == 6
    seen = []
    for i in range(len(train)):
        image, label = train[i]
        assert image.mode == "RGB" and image.size == (64, 64)
        wnid = classes[label]
        seen.append(wnid)
        _assert_close(_colour_of(image), TINY_COLOURS[wnid], grey=(i == 1))
    assert sorted(seen) == sorted(TINY_WNIDS * 2)
    for i in range(len(val)):
        image, label = val[i]
        assert classes[label] == TINY_VAL[i]
        _assert_close(_colour_of(image), TINY_COLOURS[TINY_VAL[i]])


def test_tiny_imagenet_zip_in_dataloader_workers(tmp_path):
    write_tiny(tmp_path, as_zip=True)
    train, _, classes = build_archive_datasets(
        "tinyimagenet", str(tmp_path), transforms.ToTensor(), None
    )
    loader = DataLoader(train, batch_size=2, num_workers=2)
    labels, colours = [], []
    for images, batch_labels in loader:
        labels += batch_labels.tolist()
        colours += [tuple((image.mean(dim=(1, 2)) * 255).tolist()) for image in images]
    assert labels == train.targets
    for i, (label, colour) in enumerate(zip(labels, colours)):
        _assert_close(colour, TINY_COLOURS[classes[label]], grey=(i == 1))


def _zip_fd_after_reading(dataset, queue) -> None:
    dataset[1]
    queue.put(dataset.tree._zip.fp.fileno())


def test_tiny_imagenet_zip_handle_is_reopened_after_fork(tmp_path):
    # A zip handle inherited through fork() shares its file offset with the parent: concurrent
    # reads from DataLoader workers would then return each other's bytes.
    write_tiny(tmp_path, as_zip=True)
    train, _, _ = build_archive_datasets("tinyimagenet", str(tmp_path), None, None)
    train[0]
    parent_fd = train.tree._zip.fp.fileno()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_zip_fd_after_reading, args=(train, queue))
    child.start()
    child_fd = queue.get(timeout=60)
    child.join(timeout=60)
    assert child_fd != parent_fd
    assert pickle.loads(pickle.dumps(train))[2][1] == train.targets[2]  # spawn-started workers


def test_tiny_imagenet_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiny-imagenet-200.zip"):
        build_archive_datasets("tinyimagenet", str(tmp_path), None, None)
    write_tiny(tmp_path, as_zip=False)
    (tmp_path / "tiny-imagenet-200" / "val" / "images" / "val_4.JPEG").unlink()
    with pytest.raises(FileNotFoundError, match=r"val/images/val_4\.JPEG is missing"):
        build_archive_datasets("tinyimagenet", str(tmp_path), None, None)
    (tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"val/val_annotations\.txt is missing"):
        build_archive_datasets("tinyimagenet", str(tmp_path), None, None)


def test_tiny_imagenet_corrupt_zip_and_unknown_name(tmp_path):
    (tmp_path / "tiny-imagenet-200.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(ValueError, match="not a valid zip"):
        build_archive_datasets("tinyimagenet", str(tmp_path), None, None)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_archive_datasets("mnist", str(tmp_path), None, None)


@pytest.mark.parametrize("name, as_archive", [("cifar10", True), ("tinyimagenet", True)])
def test_trainer_trains_on_the_archive_formats(tmp_path, name, as_archive):
    """`--dataset NAME --data-dir PATH` end to end: the trainer reads the real layout."""
    from conftest import check_ok, run_script

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if name == "cifar10":
        write_cifar(data_dir, name, tarball=as_archive)
    else:
        write_tiny(data_dir, as_zip=as_archive)
    out = check_ok(
        run_script(
            [
                "--dataset",
                name,
                "--data-dir",
                data_dir,
                "--model",
                "tinycnn",
                "--batch-size",
                "2",
                "--max-steps",
                "2",
                "--workers",
                "0",
                "--log-dir",
                tmp_path / "run",
            ]
        )
    )
    size = 32 if name == "cifar10" else 64
    assert f"run: {name} tinycnn" in out and "done: 2 steps" in out
    from lars.config import parse_args

    args = parse_args(["--dataset", name, "--data-dir", str(data_dir)])
    assert (args.image_size, args.model, args.hflip) == (size, "resnet18_small", True)


def test_archive_dataset_flags_are_checked(tmp_path, capsys):
    from lars.cli import main

    assert main(["--dataset", "cifar10"]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert main(["--dataset", "cifar100", "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "--data-dir" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert (
        main(
            [
                "--dataset",
                "cifar10",
                "--data-dir",
                str(tmp_path / "empty"),
                "--log-dir",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    assert "cifar-10" in capsys.readouterr().err
