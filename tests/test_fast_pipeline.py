"""lars.data.fast against torchvision's own pipeline, on JPEGs written here.

The reference is torchvision: ImageFolder's PIL loader (convert("RGB")), RandomResizedCrop,
RandomHorizontalFlip, Resize + CenterCrop, ToTensor + Normalize, run from the same torch seed.
Same seed, same box and flip: the fast sample must then match torchvision's pixels to a fraction
of a grey level at full decoding scale, and leave torch's RNG in the same state (same draws).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from lars.data import fast
from lars.data.fast import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FastImageFolder,
    TrainCrop,
    ValCrop,
    loader_settings,
    normalize_batch,
)
from lars.data.loaders import BadSample, RobustDataset


def textured(width: int, height: int, seed: int, noise: int = 0, cell: int = 16) -> Image.Image:
    """Random colour blobs about `cell` px wide (a coarse grid upsampled bicubically), plus
    optional uniform noise of +-noise levels per pixel."""
    rng = np.random.default_rng(seed)
    shape = (height // cell + 2, width // cell + 2, 3)
    coarse = rng.integers(0, 256, shape, dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    if noise:
        pixels = pixels.astype(np.int16) + rng.integers(-noise, noise + 1, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, fmt: str = "JPEG") -> bytearray:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return bytearray(buffer.getvalue())


FILES = {  # name -> (class, image, format written under a .JPEG name)
    "photo": ("cat", lambda: textured(500, 375, 0, noise=8), "JPEG"),
    "portrait": ("cat", lambda: textured(375, 500, 1), "JPEG"),
    "large": ("cat", lambda: textured(1200, 900, 2), "JPEG"),
    "png": ("dog", lambda: textured(300, 200, 3), "PNG"),
    "cmyk": ("dog", lambda: textured(320, 240, 4).convert("CMYK"), "JPEG"),
    "grey": ("dog", lambda: textured(320, 240, 5).convert("L"), "JPEG"),
    "tiny": ("dog", lambda: textured(20, 15, 6), "JPEG"),
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    for name, (label, make, fmt) in FILES.items():
        (root / label).mkdir(exist_ok=True)
        (root / label / f"{name}.JPEG").write_bytes(jpeg_bytes(make(), fmt))
    return root


def data_of(tree: Path, name: str) -> bytearray:
    return fast.read_file(str(tree / FILES[name][0] / f"{name}.JPEG"))


def reference_train(size: int = 224, scale=(0.08, 1.0), hflip: bool = True):
    steps = [transforms.RandomResizedCrop(size, scale=scale)]
    steps += [transforms.RandomHorizontalFlip()] if hflip else []
    return transforms.Compose([*steps, transforms.PILToTensor()])


def pil_rgb(data: bytearray) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")  # torchvision's ImageFolder loader


def mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def test_samples_are_uint8_chw_with_imagefolders_labels(tree):
    reference = datasets.ImageFolder(str(tree))
    for train in (True, False):
        dataset = FastImageFolder(str(tree), train=train, image_size=64)
        assert dataset.samples == reference.samples and dataset.classes == reference.classes
        for index in range(len(dataset)):
            image, label = dataset[index]
            assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
            assert image.is_contiguous() and label == reference.targets[index]
    pickle.dumps(FastImageFolder(str(tree), train=True, image_size=64))  # spawn-safe workers


@pytest.mark.parametrize("name", ["photo", "portrait", "tiny", "png", "cmyk", "grey"])
def test_same_seed_gives_torchvisions_box_flip_and_pixels(tree, name):
    data = data_of(tree, name)
    ours, reference = TrainCrop(224), reference_train(224)
    diffs = []
    for seed in range(12):
        torch.manual_seed(seed)
        sample = ours(data)
        after_ours = torch.rand(1)
        torch.manual_seed(seed)
        expected = reference(pil_rgb(data))
        assert torch.equal(after_ours, torch.rand(1)), "fast path drew a different RNG sequence"
        diffs.append(mean_abs_diff(sample, expected))
    # torch's uint8 resize rounds like PIL's to within one level; another box would be far off.
    assert max(diffs) < 0.6, diffs


def test_hflip_off_draws_no_flip(tree):
    data = data_of(tree, "photo")
    ours, reference = TrainCrop(96, hflip_p=0.0), reference_train(96, hflip=False)
    torch.manual_seed(3)
    sample = ours(data)
    state = torch.get_rng_state()
    torch.manual_seed(3)
    assert mean_abs_diff(sample, reference(pil_rgb(data))) < 0.6
    assert torch.equal(state, torch.get_rng_state())


def test_flips_half_the_time(tmp_path):
    half_dark = np.zeros((48, 64, 3), dtype=np.uint8)
    half_dark[:, 32:] = 255
    data = jpeg_bytes(Image.fromarray(half_dark))
    whole_image = TrainCrop(32, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3))
    flipped = 0
    for seed in range(400):
        torch.manual_seed(seed)
        sample = whole_image(data).float()
        left, right = sample[:, :, :8].mean(), sample[:, :, -8:].mean()
        assert abs(left - right) > 200
        flipped += int(left > right)
    assert 0.42 < flipped / 400 < 0.58  # p = 0.5, 400 draws: 4 standard deviations


@pytest.fixture
def draft_factors(monkeypatch) -> list[int]:
    """The DCT scale of every draft-mode decode made while the test runs."""
    factors: list[int] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(image, mode, size):
        factors.append(image.size[0] // size[0])
        return original(image, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return factors


def reference_val(size: int = 224, crop_ratio: float = 0.875):
    resize = transforms.Resize(int(round(size / crop_ratio)))
    return transforms.Compose([resize, transforms.CenterCrop(size), transforms.PILToTensor()])


def train_diffs(data: bytearray, ours: TrainCrop, seeds=range(12)) -> list[float]:
    reference = reference_train(ours.size)
    diffs = []
    for seed in seeds:
        torch.manual_seed(seed)
        sample = ours(data)
        torch.manual_seed(seed)
        diffs.append(mean_abs_diff(sample, reference(pil_rgb(data))))
    return diffs


def test_large_jpeg_is_draft_decoded_with_the_same_geometry(tree, draft_factors):
    data = data_of(tree, "large")  # 16 px blobs: a box one pixel off differs by ~5 levels
    diffs = train_diffs(data, TrainCrop(224))
    assert any(factor >= 2 for factor in draft_factors)  # crops over 448 px: 1/2 scale or less
    # Same box, exact fractional geometry; libjpeg's DCT-domain reduction is a slightly
    # different low-pass filter than bilinear antialiasing: under a grey level on average.
    assert max(diffs) < 1.2, diffs
    draft_factors.clear()
    assert mean_abs_diff(ValCrop(224)(data), reference_val()(pil_rgb(data))) < 1.2
    assert draft_factors == [2]  # 900 rows -> 256: decoded at 1/2


@pytest.mark.parametrize("margin", [2.0, float("inf")])
def test_draft_margin_keeps_full_scale_decoding(tree, draft_factors, margin):
    data = data_of(tree, "large")
    assert max(train_diffs(data, TrainCrop(224, draft_margin=margin))) < 0.1
    assert (
        mean_abs_diff(ValCrop(224, draft_margin=margin)(data), reference_val()(pil_rgb(data))) < 0.1
    )
    assert draft_factors == []  # 1200x900 has no crop 2 x 448 px wide


@pytest.mark.parametrize("name", list(FILES))
@pytest.mark.parametrize("size,crop_ratio", [(224, 0.875), (64, 1.0)])
def test_val_matches_resize_and_center_crop(tree, name, size, crop_ratio):
    data = data_of(tree, name)
    sample = ValCrop(size, crop_ratio, draft_margin=float("inf"))(data)
    assert sample.shape == (3, size, size) and sample.dtype == torch.uint8
    assert mean_abs_diff(sample, reference_val(size, crop_ratio)(pil_rgb(data))) < 0.1


def test_pil_only_decoding_gives_the_same_samples(tree):
    for name in FILES:
        data = data_of(tree, name)
        torch.manual_seed(1)
        fast_sample = TrainCrop(128)(data)
        torch.manual_seed(1)
        pil_sample = TrainCrop(128, fast_jpeg=False)(data)
        assert mean_abs_diff(fast_sample, pil_sample) < 0.05, name


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "png_truncated"])
def test_unreadable_files_raise_what_pil_raises_and_are_skipped(tree, tmp_path, damage):
    photo = data_of(tree, "photo")
    broken = {
        "truncated": photo[: len(photo) // 2],
        "garbage": bytearray(b"not an image at all" * 50),
        "empty": bytearray(),
        "png_truncated": data_of(tree, "png")[:400],
    }[damage]
    for transform in (TrainCrop(64), ValCrop(64)):
        with pytest.raises((OSError, ValueError)):
            transform(broken)
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "broken.JPEG").write_bytes(bytes(broken))
    robust = RobustDataset(FastImageFolder(str(tmp_path), train=True, image_size=64), seed=0)
    assert isinstance(robust[0], BadSample)


def test_normalize_batch_equals_totensor_normalize():
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (4, 3, 24, 32), dtype=torch.uint8, generator=generator)
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    to_tensor = transforms.ToTensor()
    expected = torch.stack(
        [normalize(to_tensor(Image.fromarray(image.permute(1, 2, 0).numpy()))) for image in batch]
    )
    for channels_last in (False, True):
        out = normalize_batch(batch, "cpu", channels_last=channels_last)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert batch.dtype == torch.uint8  # the input is left alone
    with pytest.raises(TypeError):
        normalize_batch(batch.float(), "cpu")


def test_loader_settings_build_a_working_loader(tree):
    assert loader_settings(0, cuda=False) == dict(
        num_workers=0, pin_memory=False, persistent_workers=False, prefetch_factor=None
    )
    settings = loader_settings(3, cuda=True)
    assert settings["num_workers"] == 3 and settings["pin_memory"]
    assert settings["persistent_workers"] and settings["prefetch_factor"] >= 2
    assert loader_settings(None, cuda=False)["num_workers"] == fast.default_workers_per_rank()
    assert 0 <= fast.default_workers_per_rank(local_ranks=64) <= fast.default_workers_per_rank()
    dataset = FastImageFolder(str(tree), train=True, image_size=32)
    images, labels = next(iter(DataLoader(dataset, batch_size=7, **loader_settings(0, False))))
    assert images.shape == (7, 3, 32, 32) and images.dtype == torch.uint8
    assert normalize_batch(images, "cpu").shape == (7, 3, 32, 32)
