"""A faster ImageFolder pipeline: uint8 crops from the workers, normalisation on the device.

The samples have the augmentation semantics of torchvision's

    RandomResizedCrop(size, scale=(min_crop_scale, 1), ratio=(3/4, 4/3))
    + RandomHorizontalFlip(0.5) + ToTensor() + Normalize(mean, std)        (training)
    Resize(round(size / crop_ratio)) + CenterCrop(size) + ToTensor() + Normalize(...)  (validation)

and, for the same torch RNG state, the same crop box and the same flip: the box comes from
`RandomResizedCrop.get_params` itself and the flip from one `torch.rand(1)` draw after it, in the
order torchvision's Compose makes them. What changes is where the time goes:

1. The box is chosen before decoding. `PIL.Image.open` only parses the header, which holds the
   width and height the box depends on.
2. A JPEG whose crop spans at least 2x (4x, 8x) the output size in both directions (times
   `draft_margin`) is decoded at 1/2 (1/4, 1/8) scale with `Image.draft`: libjpeg scales in the
   DCT domain (a smaller inverse DCT per 8x8 block), so it never produces the pixels that the
   resize would average away. The decoded crop is still at least the output size, so the result
   is still a downscale, and PIL resizes the fractional box the reduction leaves, so the
   geometry is exact. The DCT-domain reduction is a slightly different low-pass filter than
   bilinear antialiasing: on finely textured 1200x900 JPEGs the 224 px crops differ from
   torchvision's by 0.65 grey levels on average (0.005 at full scale). `draft_margin=2` keeps a
   2x resize after the reduced decode (as PIL's thumbnail does); `float("inf")` turns draft mode
   off. A 500x375 ImageNet photo cropped to 224 is decoded at full scale anyway (its crops never
   span 448 rows): larger photos, and the validation resize of photos over 512 px, gain.
3. A full-scale RGB JPEG is decoded by torchvision.io.decode_jpeg (libjpeg-turbo straight into a
   tensor, about 25% faster per image than PIL's load plus the copy out of PIL). That function
   is deprecated since torchvision 0.29 (superseded by TorchCodec): when it is missing or fails,
   PIL decodes instead, so its removal costs speed, never correctness.
4. Everything else (a PNG named .JPEG, CMYK and greyscale JPEGs, GIFs, ...) is decoded by PIL and
   converted to RGB, as torchvision's ImageFolder loader does. ImageNet holds all of these.
5. A full-scale crop is resized by torch's uint8 antialiased bilinear kernel on channels-last
   pixels: 2-3x faster than PIL's resize, and within one grey level of it (0.02 on average).
   The sample is a uint8 (3, size, size) tensor: no float conversion in the worker, and a
   quarter of the bytes through the DataLoader's shared memory.
6. `normalize_batch` converts a whole batch to float and normalises it on the device, once per
   batch, after a non_blocking copy from pinned memory.

Unreadable files raise what PIL raises (OSError, including UnidentifiedImageError, or
ValueError), so `lars.data.loaders.RobustDataset` skips them as before.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import datasets, transforms

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FastImageFolder",
    "TrainCrop",
    "ValCrop",
    "default_workers_per_rank",
    "loader_settings",
    "normalize_batch",
    "read_file",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the same figures as lars.data.loaders
IMAGENET_STD = (0.229, 0.224, 0.225)
DCT_SCALES = (8, 4, 2)  # the reductions libjpeg's scaled inverse DCT offers through PIL's draft


def read_file(path: str) -> bytearray:
    """The file's bytes (a writable buffer, so torch can wrap it without a copy)."""
    with open(path, "rb") as file:
        return bytearray(file.read())


@lru_cache(maxsize=1)
def _torchvision_jpeg_decoder() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchvision.io.decode_jpeg as an RGB decoder when it works in this process, else None."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None

    def decode(data: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():  # the 0.29 deprecation notice, once per image otherwise
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(data, mode=ImageReadMode.RGB)

    probe = io.BytesIO()
    Image.new("RGB", (16, 16)).save(probe, "JPEG")
    try:
        decode(torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8))
    except RuntimeError:  # built without libjpeg, or the image extension failed to load
        return None
    return decode


def _draft_factor(
    region_width: float, region_height: float, out_width: int, out_height: int, margin: float
) -> int:
    """The largest DCT scale that keeps the decoded region at least margin x the output size."""
    for factor in DCT_SCALES:
        reach = factor * margin
        if region_width >= reach * out_width and region_height >= reach * out_height:
            return factor
    return 1


def _decode(image: Image.Image, data: bytearray, factor: int, fast_jpeg: bool):
    """Decode a lazily opened image to RGB, at 1/factor scale if it is a JPEG.

    Returns (pixels, 1) after a full-scale decode, pixels a uint8 (3, H, W) tensor over
    channels-last memory; or (image, s) after a draft-mode decode at 1/s scale, image the reduced
    RGB PIL image, which `_pil_resized_crop` resizes with the box divided by s (fractional).
    """
    if factor == 1 and fast_jpeg and image.format == "JPEG" and image.mode == "RGB":
        decoder = _torchvision_jpeg_decoder()
        if decoder is not None:
            try:
                return decoder(torch.frombuffer(data, dtype=torch.uint8)), 1
            except RuntimeError:
                pass  # truncated or odd: PIL decodes it or raises OSError like the baseline
    reduced_by = 1
    if factor > 1:
        width = image.size[0]
        drafted = image.draft("RGB", (width // factor, image.size[1] // factor))
        if drafted is not None:  # (mode, (0, 0, width / s, height / s)) for DCT scale s
            reduced_by = round(width / drafted[1][2])
    if image.mode != "RGB":  # CMYK and greyscale JPEGs, palette or RGBA PNGs
        image = image.convert("RGB")
    if reduced_by > 1:
        return image, reduced_by
    return torch.from_numpy(np.array(image)).permute(2, 0, 1), 1


def _resize(pixels: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Antialiased bilinear resize of uint8 (3, h, w) pixels (PIL's BILINEAR filter), as a
    (3, height, width) numpy view."""
    if tuple(pixels.shape[-2:]) != (height, width):
        # torch's vectorised uint8 kernel wants dense channels-last input; a crop is a strided
        # view of the decoded image, and copying it first is 1.5-3x faster than resizing the view.
        batch = pixels.unsqueeze(0).contiguous(memory_format=torch.channels_last)
        pixels = F.interpolate(
            batch, size=(height, width), mode="bilinear", antialias=True, align_corners=False
        ).squeeze(0)
    return pixels.numpy()


def _pil_resized_crop(image: Image.Image, box, reduced_by: int, height: int, width: int):
    """The region `box` (left, top, right, bottom in original pixels) of an image decoded at
    1/reduced_by scale, resized to (3, height, width) with PIL's BILINEAR filter. PIL takes the
    fractional box that the scale leaves, so the geometry stays exact."""
    region = tuple(value / reduced_by for value in box)  # exact: reduced_by is a power of 2
    resized = image.resize((width, height), Image.Resampling.BILINEAR, box=region)
    return np.asarray(resized).transpose(2, 0, 1)


def _dense_chw(pixels: np.ndarray, flip: bool) -> torch.Tensor:
    """A contiguous uint8 (3, h, w) tensor copied from a strided view, mirrored if `flip`.

    numpy makes this transposing copy about 3x faster than torch's uint8 `.contiguous()`, and
    takes the flip as a negative stride in the same pass.
    """
    return torch.from_numpy(np.ascontiguousarray(pixels[:, :, ::-1] if flip else pixels))


class TrainCrop:
    """File bytes -> uint8 (3, size, size): RandomResizedCrop then RandomHorizontalFlip.

    The box is `RandomResizedCrop.get_params` drawn from torch's RNG with the header's size, then
    `torch.rand(1) < hflip_p` decides the flip (no draw when hflip_p is 0): a seeded sample gets
    bit-for-bit the box and flip torchvision's transforms would give it.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_p: float = 0.5,
        *,
        draft_margin: float = 1.0,
        fast_jpeg: bool = True,
    ) -> None:
        self.size, self.scale, self.ratio = size, list(scale), list(ratio)
        self.hflip_p, self.draft_margin, self.fast_jpeg = hflip_p, draft_margin, fast_jpeg

    def __call__(self, data: bytearray) -> torch.Tensor:
        image = Image.open(io.BytesIO(data))  # parses the header only
        top, left, height, width = transforms.RandomResizedCrop.get_params(
            image, self.scale, self.ratio
        )
        factor = _draft_factor(width, height, self.size, self.size, self.draft_margin)
        decoded, reduced_by = _decode(image, data, factor, self.fast_jpeg)
        if reduced_by > 1:
            box = (left, top, left + width, top + height)
            crop = _pil_resized_crop(decoded, box, reduced_by, self.size, self.size)
        else:
            region = decoded[:, top : top + height, left : left + width]
            crop = _resize(region, self.size, self.size)
        flip = self.hflip_p > 0 and bool(torch.rand(1) < self.hflip_p)
        return _dense_chw(crop, flip)

    def __repr__(self) -> str:
        return (
            f"TrainCrop(size={self.size}, scale={tuple(self.scale)}, "
            f"ratio={tuple(self.ratio)}, hflip_p={self.hflip_p})"
        )


class ValCrop:
    """File bytes -> uint8 (3, size, size): Resize(round(size / crop_ratio)) then CenterCrop.

    Sizes and offsets are rounded as torchvision rounds them. After a full-scale decode the whole
    image is resized and the centre cut out; after a draft-mode decode the centre's box, mapped
    back to the image, is resized directly (the same sampling positions).
    """

    def __init__(
        self,
        size: int,
        crop_ratio: float = 0.875,
        *,
        draft_margin: float = 1.0,
        fast_jpeg: bool = True,
    ) -> None:
        if not 0.0 < crop_ratio <= 1.0:
            raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
        self.size, self.resize_to = size, int(round(size / crop_ratio))
        self.draft_margin, self.fast_jpeg = draft_margin, fast_jpeg

    def __call__(self, data: bytearray) -> torch.Tensor:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        short, long = min(width, height), max(width, height)
        # torchvision's Resize(int): the short side becomes resize_to, the long one is truncated.
        new_short, new_long = self.resize_to, int(self.resize_to * long / short)
        new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
        top = int(round((new_height - self.size) / 2.0))
        left = int(round((new_width - self.size) / 2.0))
        factor = _draft_factor(width, height, new_width, new_height, self.draft_margin)
        decoded, reduced_by = _decode(image, data, factor, self.fast_jpeg)
        if reduced_by > 1:
            x_scale, y_scale = width / new_width, height / new_height
            box = (
                left * x_scale,
                top * y_scale,
                (left + self.size) * x_scale,
                (top + self.size) * y_scale,
            )
            crop = _pil_resized_crop(decoded, box, reduced_by, self.size, self.size)
        else:
            resized = _resize(decoded, new_height, new_width)
            crop = resized[:, top : top + self.size, left : left + self.size]
        return _dense_chw(crop, flip=False)

    def __repr__(self) -> str:
        return f"ValCrop(size={self.size}, resize_to={self.resize_to})"


class FastImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder (same file scan, `.samples`, `.classes`, labels) whose samples
    are uint8 (3, image_size, image_size) tensors from `TrainCrop` or `ValCrop`.

    Normalise batches with `normalize_batch` in the training loop. `draft_margin` as in the
    module notes (1.0: reduced decoding whenever the output is not upsampled; inf: never);
    `fast_jpeg=False` decodes every file with PIL (no torchvision.io).
    """

    def __init__(
        self,
        root: str,
        train: bool,
        image_size: int,
        min_crop_scale: float = 0.08,
        hflip: bool = True,
        crop_ratio: float = 0.875,
        *,
        draft_margin: float = 1.0,
        fast_jpeg: bool = True,
    ) -> None:
        options = dict(draft_margin=draft_margin, fast_jpeg=fast_jpeg)
        if train:
            transform = TrainCrop(
                image_size, scale=(min_crop_scale, 1.0), hflip_p=0.5 if hflip else 0.0, **options
            )
        else:
            transform = ValCrop(image_size, crop_ratio, **options)
        super().__init__(root, transform=transform, loader=read_file)


@lru_cache(maxsize=16)
def _normalize_constants(device: torch.device, dtype: torch.dtype, mean: tuple, std: tuple):
    """(scale, shift) with x * scale + shift == (x / 255 - mean) / std, cached on the device so
    that no batch pays a host-to-device copy for them."""
    std_t = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    return ((1.0 / (255.0 * std_t)).to(device, dtype), (-mean_t / std_t).to(device, dtype))


def normalize_batch(
    images: torch.Tensor,
    device: torch.device | str,
    channels_last: bool = False,
    *,
    dtype: torch.dtype = torch.float32,
    mean: tuple = IMAGENET_MEAN,
    std: tuple = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 (N, 3, H, W) batch -> normalised float batch on `device`.

    Equal (to float rounding) to ToTensor() + Normalize(mean, std) per image. The uint8 batch is
    copied with non_blocking=True (asynchronous from pinned memory), laid out channels-last on
    the device when asked (a uint8 permute, 4x cheaper than a float one), then converted and
    normalised in place as x * (1 / (255 std)) - mean / std (on the CPU a float conversion plus
    two in-place passes is about 3x faster than one mixed-dtype addcmul).
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_batch expects a uint8 batch, got {images.dtype}")
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    scale, shift = _normalize_constants(images.device, dtype, tuple(mean), tuple(std))
    return images.to(dtype).mul_(scale).add_(shift)


def default_workers_per_rank(local_ranks: int = 1) -> int:
    """Workers per rank: the cores this process may use, shared among the node's ranks, less
    one per rank for its training process, at most 8; 0 means loading in-process.

    At the 2-2.5 ms per 224 px training sample measured on one core (benchmarks/README.md), 8
    workers feed about 3500-4000 images/s, as many as one GPU trains ResNet-50 on; more workers
    would only add memory and start-up time.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores // max(1, local_ranks) - 1))


def loader_settings(workers_per_rank: int | None, cuda: bool, local_ranks: int = 1) -> dict:
    """DataLoader keyword arguments for this pipeline.

    workers_per_rank None means `default_workers_per_rank(local_ranks)`. Batches are pinned on
    CUDA (so normalize_batch's copy is asynchronous), workers persist across epochs (no new
    processes and dataset copies each epoch), and each worker keeps 4 batches in flight: uint8
    batches are a quarter of the float ones, and the slack absorbs slow files.
    """
    workers = (
        default_workers_per_rank(local_ranks) if workers_per_rank is None else workers_per_rank
    )
    return dict(
        num_workers=workers,
        pin_memory=cuda,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
