"""data/prepare_imagenet.py on tiny tarballs in the real ILSVRC2012 layout.

Three classes whose ILSVRC2012_IDs are not in wnid order (as in the real devkit), a fourth
synset with children that is not a class, two training images per class, six validation images.
The training set holds a PNG named .JPEG and a CMYK JPEG, the validation set another CMYK JPEG.
"""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

SCRIPT = Path(__file__).resolve().parents[1] / "data" / "prepare_imagenet.py"
_spec = importlib.util.spec_from_file_location("prepare_imagenet", SCRIPT)
prepare = importlib.util.module_from_spec(_spec)
sys.modules["prepare_imagenet"] = prepare  # worker processes unpickle its functions by name
_spec.loader.exec_module(prepare)

# ILSVRC2012_ID -> wnid; ID 4 is a parent synset (num_children 3), not one of the classes.
CLASS_IDS = {1: "n02119789", 2: "n01440764", 3: "n04592741"}
COLOURS = {"n02119789": (200, 60, 30), "n01440764": (30, 170, 60), "n04592741": (40, 60, 190)}
# (file name, format): the odd ones out are what the real training set contains.
TRAIN_FILES = {
    "n02119789": [("n02119789_101.JPEG", "JPEG"), ("n02119789_7.JPEG", "CMYK")],
    "n01440764": [("n01440764_10026.JPEG", "JPEG"), ("n01440764_2933.JPEG", "PNG")],
    "n04592741": [("n04592741_1.JPEG", "JPEG"), ("n04592741_2.JPEG", "GREY")],
}
VAL_TRUTH = [2, 1, 3, 3, 1, 2]  # ILSVRC2012_ID of val images 1..6
VAL_CMYK = 4


def _image(colour, kind: str) -> bytes:
    picture = Image.new("RGB", (40, 30), colour)
    out = io.BytesIO()
    if kind == "PNG":
        picture.save(out, "PNG")
    elif kind == "CMYK":
        picture.convert("CMYK").save(out, "JPEG", quality=95)
    elif kind == "GREY":
        picture.convert("L").save(out, "JPEG", quality=95)
    else:
        picture.save(out, "JPEG", quality=95)
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _meta_mat() -> bytes:
    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    synsets = np.empty((4, 1), dtype=[(f, "O") for f in fields])
    for row, (ident, wnid) in enumerate([*CLASS_IDS.items(), (4, "n00001740")]):
        leaf = ident != 4
        synsets[row, 0] = (
            np.array([[ident]], float),
            wnid,
            f"words {wnid}",
            f"gloss {wnid}",
            np.array([[0 if leaf else 3]], float),
            np.zeros((1, 0)) if leaf else np.array([[1.0, 2.0, 3.0]]),
            np.array([[0 if leaf else 2]], float),
            np.array([[2 if leaf else 0]], float),
        )
    out = io.BytesIO()
    savemat(out, {"synsets": synsets})
    return out.getvalue()


@pytest.fixture
def tars(tmp_path) -> Path:
    folder = tmp_path / "tars"
    folder.mkdir()
    with tarfile.open(folder / prepare.TRAIN_TAR, "w") as outer:
        for wnid, files in TRAIN_FILES.items():
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as class_tar:
                for name, kind in files:
                    _add(class_tar, name, _image(COLOURS[wnid], kind))
            _add(outer, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(folder / prepare.VAL_TAR, "w") as val:
        for number, ident in enumerate(VAL_TRUTH, 1):
            kind = "CMYK" if number == VAL_CMYK else "JPEG"
            _add(val, f"ILSVRC2012_val_{number:08d}.JPEG", _image(COLOURS[CLASS_IDS[ident]], kind))
    with tarfile.open(folder / prepare.DEVKIT, "w:gz") as devkit:
        _add(devkit, "ILSVRC2012_devkit_t12/COPYING", b"licence\n")
        _add(devkit, prepare.META_MAT, _meta_mat())
        _add(devkit, prepare.GROUND_TRUTH, "".join(f"{i}\n" for i in VAL_TRUTH).encode())
    return folder


def _run(tars: Path, out: Path, capsys, *extra: str) -> tuple[int, str, str]:
    status = prepare.main(["--tars", str(tars), "--out", str(out), *extra])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_builds_imagefolders_and_reencodes_odd_images(tars, tmp_path, capsys):
    out = tmp_path / "imagenet"
    status, stdout, err = _run(tars, out, capsys, "--workers", "1")
    assert status == 0, err
    assert sorted(os.listdir(out)) == ["train", "val"]
    assert sorted(os.listdir(out / "train")) == sorted(CLASS_IDS.values())
    assert sorted(os.listdir(out / "val")) == sorted(CLASS_IDS.values())
    for wnid, files in TRAIN_FILES.items():
        assert sorted(os.listdir(out / "train" / wnid)) == sorted(name for name, _ in files)
        for name, kind in files:
            path = out / "train" / wnid / name
            with Image.open(path) as image:
                assert image.format == "JPEG" and image.mode == ("L" if kind == "GREY" else "RGB")
                colour = np.asarray(image.convert("RGB")).reshape(-1, 3).mean(axis=0)
            expected = np.array(COLOURS[wnid], float)
            if kind == "GREY":  # ITU-R 601 luma in all three channels
                expected[:] = expected @ [0.299, 0.587, 0.114]
            assert np.allclose(colour, expected, atol=6), (name, colour)
            if kind in ("JPEG", "GREY"):  # valid JPEGs are copied byte for byte
                assert path.read_bytes() == _image(COLOURS[wnid], kind)
    for number, ident in enumerate(VAL_TRUTH, 1):
        path = out / "val" / CLASS_IDS[ident] / f"ILSVRC2012_val_{number:08d}.JPEG"
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
    assert sum(1 for p in (out / "val").rglob("*") if p.is_file()) == len(VAL_TRUTH)
    assert "wrote 6 images in 3 classes" in stdout and "val: wrote 6 images" in stdout
    assert "2 CMYK" in stdout and "1 PNG" in stdout


def test_second_run_skips_and_an_interrupted_run_is_finished(tars, tmp_path, capsys):
    out = tmp_path / "imagenet"
    assert _run(tars, out, capsys, "--workers", "1")[0] == 0
    first = _snapshot(out)
    status, stdout, _ = _run(tars, out, capsys, "--workers", "1")
    assert status == 0
    assert "wrote 0 images in 0 classes, skipped 3" in stdout and "val: already complete" in stdout
    assert _snapshot(out) == first  # nothing rewritten

    # As if killed mid-way: one class still in its staging folder (with a stray half file), the
    # validation set staged with two images missing.
    os.replace(out / "train" / "n02119789", out / "train" / ".n02119789.partial")
    (out / "train" / ".n02119789.partial" / "n02119789_7.JPEG").write_bytes(b"\xff\xd8half")
    os.replace(out / "val", out / ".val.partial")
    for number in (2, 4):
        wnid = CLASS_IDS[VAL_TRUTH[number - 1]]
        (out / ".val.partial" / wnid / f"ILSVRC2012_val_{number:08d}.JPEG").unlink()
    status, stdout, _ = _run(tars, out, capsys, "--workers", "1")
    assert status == 0
    assert "wrote 2 images in 1 classes, skipped 2" in stdout and "val: wrote 2 images" in stdout
    assert sorted(os.listdir(out)) == ["train", "val"]
    again = _snapshot(out)
    assert {k: v[1] for k, v in again.items()} == {k: v[1] for k, v in first.items()}
    untouched = "train/n01440764/n01440764_10026.JPEG"
    assert again[untouched][0] == first[untouched][0]


def test_parallel_workers_write_the_same_files(tars, tmp_path, capsys):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert _run(tars, serial, capsys, "--workers", "1")[0] == 0
    assert _run(tars, parallel, capsys, "--workers", "3")[0] == 0
    assert {k: v[1] for k, v in _snapshot(serial).items()} == {
        k: v[1] for k, v in _snapshot(parallel).items()
    }


def test_split_val_needs_only_the_val_tar_and_devkit(tars, tmp_path, capsys):
    (tars / prepare.TRAIN_TAR).unlink()
    status, stdout, err = _run(tars, tmp_path / "out", capsys, "--split", "val")
    assert status == 0, err
    assert sorted(os.listdir(tmp_path / "out")) == ["val"]
    assert "val: wrote 6 images" in stdout


def test_missing_tarball_is_one_line_from_the_command_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tars", str(empty), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{prepare.DEVKIT} not found" in lines[0] and str(empty) in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["TRAIN_TAR", "VAL_TAR", "DEVKIT"])
def test_each_missing_tarball_is_named(tars, tmp_path, capsys, name):
    (tars / getattr(prepare, name)).unlink()
    status, _, err = _run(tars, tmp_path / "out", capsys)
    assert status == 2 and f"{getattr(prepare, name)} not found" in err
    assert len(err.strip().splitlines()) == 1


def _cut_in_last_member(path: Path) -> None:
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    data = path.read_bytes()
    path.write_bytes(data[: last.offset_data + last.size // 2])


@pytest.mark.parametrize(
    "damage",
    [
        "train-garbage",
        "train-truncated",
        "val-truncated",
        "devkit-garbage",
        "devkit-no-ground-truth",
    ],
)
def test_damaged_tarballs_stop_with_one_line(tars, tmp_path, capsys, damage):
    which, how = damage.split("-", 1)
    path = (
        tars / {"train": prepare.TRAIN_TAR, "val": prepare.VAL_TAR, "devkit": prepare.DEVKIT}[which]
    )
    if how == "garbage":
        path.write_bytes(b"\x00garbage" * 300)
    elif how == "truncated":
        _cut_in_last_member(path)
    else:
        with tarfile.open(path, "w:gz") as devkit:
            _add(devkit, prepare.META_MAT, _meta_mat())
    # Two workers: an error inside a worker process must come back as the same one line.
    status, _, err = _run(tars, tmp_path / "out", capsys, "--workers", "2")
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and path.name in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out" / "val").exists()
