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
2. A JPEG whose crop spans at least 2x (4x, 8x) the output size in both directions is decoded at
   1/2 (1/4, 1/8) scale with `Image.draft`: libjpeg scales in the DCT domain (it runs a smaller
   inverse DCT per 8x8 block), so it never produces the pixels that the resize would average
   away. The decoded crop is still at least the output size, so the result stays a downscale;
   the DCT-domain averaging differs from bilinear antialiasing by a few grey levels. An ImageNet
   photo of about 500x375 cropped to 224 is decoded at full scale (its crops never span 448
   rows); larger photos and the validation resize of large images gain most.
3. A full-scale RGB JPEG is decoded by torchvision.io.decode_jpeg (libjpeg-turbo straight into a
   tensor, about 25% faster per image than PIL's load plus the copy out of PIL). That function
   is deprecated since torchvision 0.29 (superseded by TorchCodec): when it is missing or fails,
   PIL decodes instead, so its removal costs speed, never correctness.
4. Everything else (a PNG named .JPEG, CMYK and greyscale JPEGs, GIFs, ...) is decoded by PIL and
   converted to RGB, as torchvision's ImageFolder loader does. ImageNet holds all of these.
5. The crop is resized by torch's uint8 antialiased bilinear kernel on the channels-last pixels
   (about 2x faster than PIL's resize; it matches PIL's filter to about one grey level), and the
   sample is a uint8 (3, size, size) tensor: no float conversion in the worker, and a quarter
   of the bytes through the DataLoader's shared memory.
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


def _draft_factor(region_width: float, region_height: float, out_width: int, out_height: int) -> int:
    """The largest DCT scale that keeps the decoded region at least the output size."""
    for factor in DCT_SCALES:
        if region_width >= factor * out_width and region_height >= factor * out_height:
            return factor
    return 1


def _decode(image: Image.Image, data: bytearray, factor: int, fast_jpeg: bool):
    """Decode a lazily opened image to uint8 RGB pixels at 1/factor scale (JPEG only).

    Returns (pixels, scale): pixels is a (3, H, W) view of channels-last memory, scale the
    decoded size per original pixel (1.0 unless draft mode reduced it).
    """
    if factor == 1 and fast_jpeg and image.format == "JPEG" and image.mode == "RGB":
        decoder = _torchvision_jpeg_decoder()
        if decoder is not None:
            try:
                return decoder(torch.frombuffer(data, dtype=torch.uint8)), 1.0
            except RuntimeError:
                pass  # truncated or odd: PIL decodes it or raises OSError like the baseline
    scale = 1.0
    if factor > 1:
        width = image.size[0]
        drafted = image.draft("RGB", (width // factor, image.size[1] // factor))
        if drafted is not None:  # (mode, (0, 0, width / s, height / s)) for DCT scale s
            scale = drafted[1][2] / width
    if image.mode != "RGB":  # CMYK and greyscale JPEGs, palette or RGBA PNGs
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1), scale


def _resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 (3, h, w) pixels, PIL's BILINEAR filter."""
    if tuple(pixels.shape[-2:]) == (height, width):
        return pixels
    # torch's vectorised uint8 kernel wants dense channels-last input; a crop is a strided view
    # of the decoded image, and copying it first is 1.5-3x faster than resizing the view.
    batch = pixels.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    resized = F.interpolate(batch, size=(height, width), mode="bilinear", antialias=True,
                            align_corners=False)
    return resized.squeeze(0)


def _dense_chw(pixels: torch.Tensor, flip: bool) -> torch.Tensor:
    """A contiguous (3, h, w) copy of channels-last pixels, mirrored left-right if `flip`.

    numpy does this transposing copy about 3x faster than torch's uint8 `.contiguous()`, and
    takes the flip as a negative stride in the same pass.
    """
    array = pixels.numpy()
    return torch.from_numpy(np.ascontiguousarray(array[:, :, ::-1] if flip else array))


def _span(start: float, length: float, scale: float, limit: int) -> slice:
    """The decoded pixels covering [start, start + length) of the original image."""
    first = min(max(int(round(start * scale)), 0), limit - 1)
    last = min(max(int(round((start + length) * scale)), first + 1), limit)
    return slice(first, last)


class TrainCrop:
    """File bytes -> uint8 (3, size, size): RandomResizedCrop then RandomHorizontalFlip.

    The box is `RandomResizedCrop.get_params` drawn from torch's RNG with the header's size, then
    `torch.rand(1) < hflip_p` decides the flip (no draw when hflip_p is 0): a seeded sample gets
    bit-for-bit the box and flip torchvision's transforms would give it.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip_p: float = 0.5,
                 *, fast_jpeg: bool = True) -> None:
        self.size, self.scale, self.ratio = size, list(scale), list(ratio)
        self.hflip_p, self.fast_jpeg = hflip_p, fast_jpeg

    def __call__(self, data: bytearray) -> torch.Tensor:
        image = Image.open(io.BytesIO(data))  # parses the header only
        top, left, height, width = transforms.RandomResizedCrop.get_params(
            image, self.scale, self.ratio)
        factor = _draft_factor(width, height, self.size, self.size)
        pixels, scale = _decode(image, data, factor, self.fast_jpeg)
        rows = _span(top, height, scale, pixels.shape[1])
        cols = _span(left, width, scale, pixels.shape[2])
        crop = _resize(pixels[:, rows, cols], self.size, self.size)
        flip = self.hflip_p > 0 and bool(torch.rand(1) < self.hflip_p)
        return _dense_chw(crop, flip)

    def __repr__(self) -> str:
        return (f"TrainCrop(size={self.size}, scale={tuple(self.scale)}, "
                f"ratio={tuple(self.ratio)}, hflip_p={self.hflip_p})")


class ValCrop:
    """File bytes -> uint8 (3, size, size): Resize(round(size / crop_ratio)) then CenterCrop.

    The whole image is resized (from a draft-scaled decode when it is at least twice the resized
    size) and the centre cut out, with torchvision's rounding of sizes and offsets.
    """

    def __init__(self, size: int, crop_ratio: float = 0.875, *, fast_jpeg: bool = True) -> None:
        if not 0.0 < crop_ratio <= 1.0:
            raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
        self.size, self.resize_to = size, int(round(size / crop_ratio))
        self.fast_jpeg = fast_jpeg

    def __call__(self, data: bytearray) -> torch.Tensor:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        short, long = min(width, height), max(width, height)
        # torchvision's Resize(int): the short side becomes resize_to, the long one is truncated.
        new_short, new_long = self.resize_to, int(self.resize_to * long / short)
        new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
        factor = _draft_factor(width, height, new_width, new_height)
        pixels, _ = _decode(image, data, factor, self.fast_jpeg)
        resized = _resize(pixels, new_height, new_width)
        top = int(round((new_height - self.size) / 2.0))
        left = int(round((new_width - self.size) / 2.0))
        return _dense_chw(resized[:, top:top + self.size, left:left + self.size], flip=False)

    def __repr__(self) -> str:
        return f"ValCrop(size={self.size}, resize_to={self.resize_to})"


class FastImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder (same file scan, `.samples`, `.classes`, labels) whose samples
    are uint8 (3, image_size, image_size) tensors from `TrainCrop` or `ValCrop`.

    Normalise batches with `normalize_batch` in the training loop. `fast_jpeg=False` decodes every
    file with PIL (no torchvision.io).
    """

    def __init__(self, root: str, train: bool, image_size: int, min_crop_scale: float = 0.08,
                 hflip: bool = True, crop_ratio: float = 0.875, *, fast_jpeg: bool = True) -> None:
        if train:
            transform = TrainCrop(image_size, scale=(min_crop_scale, 1.0),
                                  hflip_p=0.5 if hflip else 0.0, fast_jpeg=fast_jpeg)
        else:
            transform = ValCrop(image_size, crop_ratio, fast_jpeg=fast_jpeg)
        super().__init__(root, transform=transform, loader=read_file)


@lru_cache(maxsize=16)
def _normalize_constants(device: torch.device, dtype: torch.dtype, mean: tuple, std: tuple):
    """(scale, shift) with x * scale + shift == (x / 255 - mean) / std, cached on the device so
    that no batch pays a host-to-device copy for them."""
    std_t = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    return ((1.0 / (255.0 * std_t)).to(device, dtype), (-mean_t / std_t).to(device, dtype))


def normalize_batch(images: torch.Tensor, device: torch.device | str, channels_last: bool = False,
                    *, dtype: torch.dtype = torch.float32, mean: tuple = IMAGENET_MEAN,
                    std: tuple = IMAGENET_STD) -> torch.Tensor:
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
    """The cores this process may use, shared among the ranks on the node, less one per rank for
    its training process, at most 8 (at about 1.5-2 ms per 224 px sample and core, 8 workers feed
    4000+ images/s, more than one GPU trains ResNet-50 on); 0 means loading in-process."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores // max(1, local_ranks) - 1))


def loader_settings(workers_per_rank: int | None, cuda: bool, local_ranks: int = 1) -> dict:
    """DataLoader keyword arguments for this pipeline.

    workers_per_rank None means `default_workers_per_rank(local_ranks)`. Batches are pinned on
    CUDA (so normalize_batch's copy is asynchronous), workers persist across epochs (no re-fork
    and re-scan per epoch), and each worker keeps 4 batches in flight: uint8 batches are small,
    and the slack absorbs slow files.
    """
    workers = default_workers_per_rank(local_ranks) if workers_per_rank is None else workers_per_rank
    return dict(num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0,
                prefetch_factor=4 if workers > 0 else None)
