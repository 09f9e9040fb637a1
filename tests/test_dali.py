"""The DALI backends (lars.data.dali) against independent references.

References: torch's DistributedSampler for which files a rank's batches hold (every image here
is one flat colour that names its index, so any crop of it still does); torchvision's
RandomResizedCrop.get_params for the distribution of crop areas and aspect ratios (read back
from images whose red and green channels are their x and y coordinates); torchvision's
Resize + CenterCrop for validation pixels; PIL's convert("RGB") for PNG, CMYK, greyscale and GIF
files named .JPEG. The GPU path ("mixed" decoding) is checked for its graph on any machine and
run only where CUDA is available.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision import transforms

from lars.data.loaders import (
    CorruptSampleError,
    DataBackendError,
    DataConfig,
    build_datasets,
    build_loaders,
)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


# launch/setup.sh leaves this file in a venv where it installed DALI: there the tests must run.
DALI_EXPECTED = Path(sys.prefix, ".lars-with-dali").exists()
if not dali_available():
    if DALI_EXPECTED:
        raise ImportError(f"{sys.prefix} was set up with DALI, but nvidia.dali does not import")
needs_dali = pytest.mark.skipif(
    not dali_available(), reason="NVIDIA DALI is not installed (LARS_WITH_DALI=1 launch/setup.sh)"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def config(root: Path, **overrides) -> DataConfig:
    settings = dict(
        train_dir=str(root / "train"),
        val_dir=str(root / "val"),
        synthetic=False,
        image_size=32,
        min_crop_scale=0.08,
        hflip=True,
        batch_size=4,
        val_batch_size=3,
        workers=1,
        seed=0,
        backend="dali-cpu",
    )
    return DataConfig(**{**settings, **overrides})


def save(image: Image.Image, path: Path, fmt: str = "PNG", **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **options)


def flat(index: int, size=(40, 30)) -> Image.Image:
    """A flat colour whose red level is 8 * index (index < 32)."""
    return Image.new("RGB", size, (8 * index, 255 - 8 * index, 128))


def index_of(images: torch.Tensor) -> list[int]:
    return [round(float(image[0].float().mean()) / 8) for image in images]


@pytest.fixture(scope="module")
def coded(tmp_path_factory) -> Path:
    """train: 26 flat images (files 0-25 in two classes), val: 11; PNG bytes named .JPEG."""
    root = tmp_path_factory.mktemp("coded")
    for index in range(26):
        save(flat(index), root / "train" / f"c{index % 2}" / f"{index:02d}.JPEG")
    for index in range(11):
        save(flat(index), root / "val" / f"c{index % 2}" / f"{index:02d}.JPEG")
    return root


def file_indices(loader, samples) -> list[list[int]]:
    """Per batch, the indices of the files it holds (read back from the colours)."""
    by_name = {int(Path(path).stem): i for i, (path, _) in enumerate(samples)}
    return [[by_name[k] for k in index_of(images)] for images, _, _ in loader]


@needs_dali
@pytest.mark.parametrize("world_size", [1, 2])
def test_train_batches_hold_the_samplers_files_each_epoch(coded, world_size):
    cfg = config(coded)
    for rank in range(world_size):
        loaders = build_loaders(cfg, rank, world_size, pin_memory=False)
        samples = loaders.train.samples
        for epoch, skip in ((0, 0), (1, 0), (1, 4)):
            reference = DistributedSampler(
                range(len(samples)), num_replicas=world_size, rank=rank, shuffle=True, seed=0
            )
            reference.set_epoch(epoch)
            order = list(reference)[skip:]
            expected = [order[i : i + 4] for i in range(0, len(order) - len(order) % 4, 4)]
            loaders.train_sampler.set_epoch(epoch)
            loaders.train_sampler.skip_samples = skip
            batches = list(loaders.train)
            held = file_indices(batches, samples)
            assert held == expected
            assert len(loaders.train) == len(expected)
            for (images, labels, bad), indices in zip(batches, held):
                assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
                assert labels.dtype == torch.int64 and bad == []
                assert labels.tolist() == [samples[i][1] for i in indices]


@needs_dali
def test_validation_shards_are_disjoint_unpadded_and_cover_the_set(coded):
    seen = []
    for rank in range(3):
        loaders = build_loaders(config(coded), rank, 3, pin_memory=False)
        batches = file_indices(loaders.val, loaders.val.samples)
        assert [len(b) for b in batches] == [3, 1] if rank < 2 else [3]  # 4, 4, 3 files
        assert sum(batches, []) == list(range(rank, 11, 3))
        seen += sum(batches, [])
    assert sorted(seen) == list(range(11))


def coordinates(width: int = 240, height: int = 180) -> Image.Image:
    """Red = x and green = y, each spread over 0-255: a crop's pixels give back its box."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.round(np.linspace(0, 255, width))[None, :]
    pixels[..., 1] = np.round(np.linspace(0, 255, height))[:, None]
    return Image.fromarray(pixels)


def crop_box(image: torch.Tensor, width: int, height: int):
    """(area fraction, aspect ratio w/h, flipped) of the crop that made `image`."""
    red, green = image[0].double().mean(0), image[1].double().mean(1)  # per column, per row
    flipped = bool(red[-1] < red[0])
    if flipped:
        red = red.flip(0)
    out = image.shape[-1]
    # Output pixel c samples x = left + (c + 1/2) w / out - 1/2: end columns are w(out-1)/out apart.
    crop_w = float(red[-1] - red[0]) * (width - 1) / 255 * out / (out - 1)
    crop_h = float(green[-1] - green[0]) * (height - 1) / 255 * out / (out - 1)
    return crop_w * crop_h / (width * height), crop_w / crop_h, flipped


@pytest.fixture(scope="module")
def gradients(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gradients")
    for index in range(100):
        save(coordinates(), root / "train" / "c" / f"{index:03d}.JPEG")
    save(coordinates(), root / "val" / "c" / "0.JPEG")
    return root


def reference_crops(n: int, scale: float, width: int = 240, height: int = 180):
    """(area fractions, log aspect ratios) of torchvision's RandomResizedCrop boxes."""
    generator_state = torch.get_rng_state()
    torch.manual_seed(0)
    image = coordinates(width, height)
    areas, log_ratios = [], []
    for _ in range(n):
        _, _, h, w = transforms.RandomResizedCrop.get_params(image, [scale, 1.0], [3 / 4, 4 / 3])
        areas.append(w * h / (width * height))
        log_ratios.append(math.log(w / h))
    torch.set_rng_state(generator_state)
    return np.array(areas), np.array(log_ratios)


@needs_dali
@pytest.mark.parametrize("scale", [0.08, 0.35])
def test_random_resized_crops_follow_torchvisions_distribution(gradients, scale):
    cfg = config(gradients, image_size=48, min_crop_scale=scale, batch_size=50)
    loaders = build_loaders(cfg, 0, 1, pin_memory=False)
    boxes = []
    for epoch in range(4):
        loaders.train_sampler.set_epoch(epoch)
        boxes += [crop_box(image, 240, 180) for images, _, _ in loaders.train for image in images]
    areas = np.array([area for area, _, _ in boxes])
    log_ratios = np.log([ratio for _, ratio, _ in boxes])
    flips = sum(flipped for _, _, flipped in boxes)
    ref_areas, ref_log_ratios = reference_crops(20000, scale)
    n = len(boxes)
    assert n == 400
    # Recovered boxes are within about a pixel: 2% of the area, 2% of the ratio.
    assert areas.min() > scale - 0.02 and areas.max() < 1.02
    assert log_ratios.min() > math.log(3 / 4) - 0.02 and log_ratios.max() < math.log(4 / 3) + 0.02
    # Means within 4 standard errors of torchvision's (plus the recovery's error).
    assert abs(areas.mean() - ref_areas.mean()) < 4 * ref_areas.std() / math.sqrt(n) + 0.01
    assert abs(log_ratios.mean() - ref_log_ratios.mean()) < 4 * ref_log_ratios.std() / math.sqrt(n)
    assert abs(flips - n / 2) < 4 * math.sqrt(n / 4)  # coin flips with p = 1/2


@needs_dali
def test_no_flips_without_hflip(gradients):
    loaders = build_loaders(config(gradients, hflip=False, batch_size=50), 0, 1, False)
    boxes = [crop_box(image, 240, 180) for images, _, _ in loaders.train for image in images]
    assert len(boxes) == 100 and not any(flipped for _, _, flipped in boxes)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Smooth photos-like images, landscape and portrait, JPEG and PNG, for validation."""
    from test_fast_pipeline import textured

    root = tmp_path_factory.mktemp("photos")
    save(textured(200, 150, 0), root / "val" / "c" / "a.JPEG", "JPEG", quality=95)
    save(textured(150, 200, 1), root / "val" / "c" / "b.JPEG", "PNG")
    save(textured(333, 250, 2), root / "val" / "c" / "c.JPEG", "JPEG", quality=95)
    save(textured(64, 64, 3), root / "train" / "c" / "a.JPEG")
    return root


@needs_dali
@pytest.mark.parametrize("size, crop_ratio", [(64, 0.875), (48, 1.0), (57, 0.8)])
def test_validation_crops_match_torchvisions_resize_and_centre_crop(photos, size, crop_ratio):
    cfg = config(photos, image_size=size, val_crop_ratio=crop_ratio, val_batch_size=2)
    loaders = build_loaders(cfg, 0, 1, pin_memory=False)
    reference = transforms.Compose(
        [
            transforms.Resize(int(round(size / crop_ratio))),
            transforms.CenterCrop(size),
            transforms.PILToTensor(),
        ]
    )
    images = torch.cat([batch for batch, _, _ in loaders.val])
    assert images.shape == (3, 3, size, size)
    for image, (path, _) in zip(images, loaders.val.samples):
        expected = reference(Image.open(path).convert("RGB"))
        difference = (image.int() - expected.int()).abs().double()
        # DALI's antialiased linear filter vs PIL's bilinear one: same geometry, rounding apart.
        assert difference.mean() < 0.5 and difference.max() <= 3, path


ODD = {  # name -> (PIL image maker, format written under the .JPEG name)
    "a-jpeg": (lambda image: image, "JPEG"),
    "b-png": (lambda image: image, "PNG"),
    "c-cmyk": (lambda image: image.convert("CMYK"), "JPEG"),
    "d-grey": (lambda image: image.convert("L"), "JPEG"),
    "e-gif": (lambda image: image.convert("P"), "GIF"),  # DALI has no GIF decoder: PIL converts
    "f-rgba": (lambda image: image.convert("RGBA"), "PNG"),
}


@pytest.fixture()
def odd(tmp_path) -> Path:
    from test_fast_pipeline import textured

    for i, (name, (make, fmt)) in enumerate(ODD.items()):
        save(make(textured(48, 48, i)), tmp_path / "val" / "c" / f"{name}.JPEG", fmt)
        save(make(textured(48, 48, i)), tmp_path / "train" / "c" / f"{name}.JPEG", fmt)
    return tmp_path


def break_files(root: Path, split: str) -> list[str]:
    """A non-image and a truncated JPEG, named to sort after the good files."""
    broken = root / split / "c" / "x-text.JPEG"
    broken.write_bytes(b"not an image at all")
    truncated = root / split / "c" / "y-truncated.JPEG"
    truncated.write_bytes((root / split / "c" / "a-jpeg.JPEG").read_bytes()[:300])
    return [str(broken), str(truncated)]


@needs_dali
def test_odd_files_decode_as_pils_rgb(odd):
    cfg = config(odd, image_size=48, val_crop_ratio=1.0, val_batch_size=4)
    loaders = build_loaders(cfg, 0, 1, pin_memory=False)
    images = torch.cat([batch for batch, _, bad in loaders.val if not bad])
    for image, (path, _) in zip(images, loaders.val.samples):
        expected = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        assert (image.int() - expected.int()).abs().max() <= 1, path


@needs_dali
def test_unreadable_files_are_skipped_and_reported_every_epoch(odd):
    bad_files = break_files(odd, "train")
    loaders = build_loaders(config(odd, batch_size=2), 0, 1, pin_memory=False)
    for epoch in range(2):
        loaders.train_sampler.set_epoch(epoch)
        batches = list(loaders.train)
        assert len(batches) == len(loaders.train) == 4  # 8 files, batch 2, as the sampler says
        reported = sorted(sum((bad for _, _, bad in batches), []))
        assert reported == sorted(bad_files)
        good = sum(len(labels) for _, labels, _ in batches if labels is not None)
        assert good == 6
        for images, labels, bad in batches:  # a batch holds its own files less the bad ones
            if images is not None:
                assert len(images) == len(labels) == 2 - len(bad)


@needs_dali
def test_a_batch_of_only_unreadable_files_is_empty_not_dropped(odd):
    bad_files = break_files(odd, "val")
    loaders = build_loaders(config(odd, val_batch_size=2), 0, 1, pin_memory=False)
    batches = list(loaders.val)
    assert len(batches) == len(loaders.val) == 4
    assert batches[-1] == (None, None, bad_files)  # x-text and y-truncated sort last
    assert sum(len(labels) for _, labels, _ in batches[:-1]) == 6


@needs_dali
def test_strict_data_stops_at_the_first_unreadable_file(odd):
    bad_files = break_files(odd, "val")
    loaders = build_loaders(config(odd, val_batch_size=2, strict_data=True), 0, 1, False)
    with pytest.raises(CorruptSampleError, match="unreadable file .*x-text.JPEG.*--strict-data"):
        list(loaders.val)
    assert bad_files


@needs_dali
def test_crops_repeat_for_the_same_seed_and_epoch_whatever_the_threads(gradients):
    def epoch_images(cfg, epoch):
        loaders = build_loaders(cfg, 0, 1, pin_memory=False)
        loaders.train_sampler.set_epoch(epoch)
        return torch.cat([images for images, _, _ in loaders.train])

    cfg = config(gradients, batch_size=25, workers=2)
    first = epoch_images(cfg, 0)
    assert torch.equal(first, epoch_images(cfg, 0))  # a fresh loader: the same crops
    assert torch.equal(first, epoch_images(config(gradients, batch_size=25, workers=3), 0))
    assert not torch.equal(first, epoch_images(cfg, 1))
    assert not torch.equal(first, epoch_images(config(gradients, batch_size=25, seed=1), 0))


def test_missing_dali_is_one_clear_error(coded_or_tmp, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import now raises ImportError
    for backend in ("dali-cpu", "dali-gpu"):
        with pytest.raises(DataBackendError) as caught:
            build_datasets(config(coded_or_tmp, backend=backend))
        message = str(caught.value)
        assert f"--data-backend {backend} needs NVIDIA DALI" in message
        assert "pip install nvidia-dali-cuda130" in message and "\n" not in message


@pytest.fixture()
def coded_or_tmp(tmp_path) -> Path:
    for split in ("train", "val"):
        save(flat(1), tmp_path / split / "c" / "0.JPEG")
    return tmp_path


@needs_dali
def test_backends_that_cannot_serve_the_data_are_refused(coded_or_tmp):
    with pytest.raises(DataBackendError, match="--dataset cifar10 is decoded from its archive"):
        build_datasets(config(coded_or_tmp, dataset="cifar10", data_dir=str(coded_or_tmp)))
    with pytest.raises(DataBackendError, match="--data-backend 'dali' is not one of"):
        build_datasets(config(coded_or_tmp, backend="dali"))
    with pytest.raises(FileNotFoundError, match="--val-dir"):
        build_datasets(config(coded_or_tmp, val_dir=str(coded_or_tmp / "nowhere")))
    if not torch.cuda.is_available():
        with pytest.raises(DataBackendError, match="dali-gpu needs a CUDA GPU"):
            build_datasets(config(coded_or_tmp, backend="dali-gpu"))


def test_synthetic_backend_is_the_synthetic_data(coded_or_tmp):
    train, val, classes = build_datasets(config(coded_or_tmp, backend="synthetic"))
    assert type(train).__name__ == "SyntheticImages" and len(classes) == 1000
    pytorch = build_datasets(config(coded_or_tmp, backend="pytorch"))
    assert len(pytorch[0]) == 1 and pytorch[2] == ["c"]


def graph_ops(node, depth=0) -> list[tuple[str, str]]:
    """(operator, device) for every operator that feeds `node`, outputs first."""
    spec = str(node.source.spec)
    name = spec.split("OpSpec for ", 1)[1].split(":", 1)[0]
    device = spec.split("device: ", 1)[1].split()[0]
    ops = [(name, device)]
    for parent in node.source.inputs:
        ops += graph_ops(parent, depth + 1)
    return ops


@needs_dali
def test_dali_gpu_graph_decodes_on_the_device_with_the_fused_random_crop():
    """Built, not run: a GPU pipeline cannot be built without CUDA."""
    from nvidia.dali import Pipeline, fn, types

    from lars.data.dali import train_graph, val_graph

    pipe = Pipeline(batch_size=2, num_threads=1, device_id=0)
    with pipe:
        jpegs = fn.external_source(name="jpegs", batch=True, dtype=types.UINT8)
        train = train_graph(jpegs, size=224, min_crop_scale=0.08, hflip=True, gpu=True)
        val = val_graph(jpegs, size=224, crop_ratio=0.875, gpu=True)
    train_ops, val_ops = graph_ops(train), graph_ops(val)
    assert train.device == "gpu" and val.device == "gpu"
    assert ("decoders__ImageRandomCrop", "mixed") in train_ops
    assert ("Resize", "gpu") in train_ops and ("CropMirrorNormalize", "gpu") in train_ops
    assert ("decoders__Image", "mixed") in val_ops and ("Resize", "gpu") in val_ops
    cpu = Pipeline(batch_size=2, num_threads=1, device_id=None)
    with cpu:
        jpegs = fn.external_source(name="jpegs", batch=True, dtype=types.UINT8)
        ops = graph_ops(train_graph(jpegs, size=224, min_crop_scale=0.08, hflip=True, gpu=False))
    assert ("decoders__ImageRandomCrop", "cpu") in ops and all(d == "cpu" for _, d in ops)


@needs_dali
@needs_cuda
def test_dali_gpu_batches_are_on_the_device_and_match_dali_cpu(photos, coded):
    cpu = build_loaders(config(photos, backend="dali-cpu"), 0, 1, pin_memory=True)
    gpu = build_loaders(config(photos, backend="dali-gpu"), 0, 1, pin_memory=True)
    (gpu_images, gpu_labels, _), *_ = list(gpu.val)
    (cpu_images, cpu_labels, _), *_ = list(cpu.val)
    assert gpu_images.is_cuda and gpu_images.dtype == torch.uint8
    assert cpu_images.is_pinned()
    assert torch.equal(gpu_labels, cpu_labels)
    # nvJPEG's IDCT and the GPU resize round differently from libjpeg-turbo: a grey level or two.
    assert (gpu_images.cpu().int() - cpu_images.int()).abs().double().mean() < 1.0
    loaders = build_loaders(config(coded, backend="dali-gpu"), 0, 2, pin_memory=True)
    reference = DistributedSampler(range(26), num_replicas=2, rank=0, shuffle=True, seed=0)
    order = list(reference)
    assert file_indices(loaders.train, loaders.train.samples) == [
        order[0:4],
        order[4:8],
        order[8:12],
    ]


@needs_dali
def test_normalised_dali_batches_equal_torchvisions_float_pipeline(photos):
    from lars.data.fast import IMAGENET_MEAN, IMAGENET_STD, normalize_batch

    cfg = config(photos, image_size=64, val_batch_size=3)
    images, _, _ = next(iter(build_loaders(cfg, 0, 1, pin_memory=False).val))
    normalised = normalize_batch(images, "cpu")
    reference = transforms.Compose(
        [
            transforms.Resize(73),
            transforms.CenterCrop(64),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    paths = [path for path, _ in build_datasets(cfg)[1].samples]
    expected = torch.stack([reference(Image.open(p).convert("RGB")) for p in paths])
    assert normalised.dtype == torch.float32 and normalised.shape == expected.shape
    assert (normalised - expected).abs().mean() < 0.5 / 255 / min(IMAGENET_STD)


def test_setup_marker_is_what_the_skip_checks():
    """launch/setup.sh writes the marker that makes a missing DALI an error here."""
    script = (Path(__file__).resolve().parents[1] / "launch" / "setup.sh").read_text()
    assert ".lars-with-dali" in script and "nvidia-dali-cuda130" in script
    if DALI_EXPECTED:
        assert dali_available()
