"""The two asymmetric views of Barlow Twins, seeded per sample like the classification pipeline.

Zbontar et al. 2021 (arXiv:2103.03230), appendix "Image augmentations" (BYOL's set, Grill et al.
2020): each view is, in this order,

    RandomResizedCrop(size, scale=(0.08, 1), bicubic)       both views
    horizontal flip                          p = 0.5        both views
    colour jitter 0.4 / 0.4 / 0.2 / 0.1      p = 0.8        (brightness, contrast, saturation,
                                                             hue; in a random order)
    grayscale                                p = 0.2
    Gaussian blur, sigma ~ U(0.1, 2.0)       p = 1.0  |  0.1     (view 1 | view 2)
    solarisation (threshold 128)             p = 0.0  |  0.2
    ToTensor, Normalize(ImageNet mean, std)

Sizes for 32-64 px inputs: the blur's sigma range is the original's at 224 px scaled by
size / 224 (the same blur relative to the object), with a kernel of 2 ceil(3 sigma_max) + 1 >= 3
pixels; at 224 px this is the original's (PIL's radius is sigma). The crop scale keeps 0.08.

Every random decision comes from torch's global RNG, in a fixed order (`BarlowTwinsView.draw`),
so `lars.data.loaders.RobustDataset`, which seeds that RNG from (seed, epoch, index) before it
loads sample `index`, makes the pair a pure function of the three, whatever the rank or worker.
Each view is a `draw()` (the decisions, a dict) then an `apply()` (pure pixels), so tests can
count decisions. `BarlowTwinsPair` returns the two views stacked: a batch is (n, 2, 3, H, W).

    train = torchvision.datasets.ImageFolder(root, transform=BarlowTwinsPair(32))
    pairs = RobustDataset(train, seed=0)        # pairs[(epoch, i)] -> ((2, 3, 32, 32), label)
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from lars.data.fast import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["BarlowTwinsPair", "BarlowTwinsView", "blur_settings"]

JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
BLUR_SIGMA_AT_224 = (0.1, 2.0)
VIEW_PROBABILITIES = (  # (blur, solarisation) of view 1 and of view 2
    (1.0, 0.0),
    (0.1, 0.2),
)


def blur_settings(size: int) -> tuple[int, tuple[float, float]]:
    """(kernel size, sigma range) for `size` px images: the original's sigma x size / 224."""
    low, high = (sigma * size / 224 for sigma in BLUR_SIGMA_AT_224)
    return max(3, 2 * math.ceil(3 * high) + 1), (low, high)


def _chance(p: float) -> bool:
    return bool(torch.rand(1) < p)  # always one draw, so later decisions keep their place


class BarlowTwinsView:
    """One view's augmentation: `draw(width, height)` decides, `apply(image, decisions)` does."""

    def __init__(
        self,
        size: int,
        blur_p: float,
        solarize_p: float,
        *,
        min_crop_scale: float = 0.08,
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        hflip_p: float = 0.5,
        normalize: bool = True,
    ) -> None:
        self.size, self.blur_p, self.solarize_p = size, blur_p, solarize_p
        self.scale, self.ratio = (min_crop_scale, 1.0), (3 / 4, 4 / 3)
        self.jitter_p, self.grayscale_p, self.hflip_p = jitter_p, grayscale_p, hflip_p
        self.kernel, self.sigma = blur_settings(size)
        self.normalize = normalize
        b, c, s, h = JITTER
        self.jitter_ranges = ([1 - b, 1 + b], [1 - c, 1 + c], [1 - s, 1 + s], [-h, h])

    def draw(self, width: int, height: int) -> dict:
        """The view's random decisions for a width x height image, from torch's RNG."""
        box = transforms.RandomResizedCrop.get_params(
            Image.new("L", (width, height)), list(self.scale), list(self.ratio)
        )
        decisions = {"box": box, "flip": _chance(self.hflip_p), "jitter": None}
        if _chance(self.jitter_p):
            order, *factors = transforms.ColorJitter.get_params(*self.jitter_ranges)
            decisions["jitter"] = (order.tolist(), [float(f) for f in factors])
        decisions["grayscale"] = _chance(self.grayscale_p)
        blur = _chance(self.blur_p)
        sigma = float(torch.empty(1).uniform_(*self.sigma))
        decisions["blur_sigma"] = sigma if blur else None
        decisions["solarize"] = _chance(self.solarize_p)
        return decisions

    def apply(self, image: Image.Image, decisions: dict) -> torch.Tensor:
        """The pixels for `decisions`: a float (3, size, size) tensor, normalised if asked."""
        top, left, height, width = decisions["box"]
        size = [self.size, self.size]
        image = TF.resized_crop(
            image.convert("RGB"), top, left, height, width, size, InterpolationMode.BICUBIC
        )
        if decisions["flip"]:
            image = TF.hflip(image)
        if decisions["jitter"] is not None:
            image = _jitter(image, *decisions["jitter"])
        if decisions["grayscale"]:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        if decisions["blur_sigma"] is not None:
            sigma = decisions["blur_sigma"]
            image = TF.gaussian_blur(image, [self.kernel, self.kernel], [sigma, sigma])
        if decisions["solarize"]:
            image = TF.solarize(image, 128)
        tensor = TF.to_tensor(image)
        return TF.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD) if self.normalize else tensor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.apply(image, self.draw(*image.size))

    def __repr__(self) -> str:
        return (
            f"BarlowTwinsView(size={self.size}, blur_p={self.blur_p}, sigma={self.sigma}, "
            f"kernel={self.kernel}, solarize_p={self.solarize_p}, scale={self.scale})"
        )


def _jitter(image: Image.Image, order: list[int], factors: list[float]) -> Image.Image:
    brightness, contrast, saturation, hue = factors
    adjust = (
        lambda im: TF.adjust_brightness(im, brightness),
        lambda im: TF.adjust_contrast(im, contrast),
        lambda im: TF.adjust_saturation(im, saturation),
        lambda im: TF.adjust_hue(im, hue),
    )
    for index in order:
        image = adjust[index](image)
    return image


class BarlowTwinsPair:
    """image -> (2, 3, size, size): view 1 (blur always, no solarisation), then view 2."""

    def __init__(self, size: int, *, min_crop_scale: float = 0.08, normalize: bool = True):
        self.views = tuple(
            BarlowTwinsView(
                size, blur_p, solarize_p, min_crop_scale=min_crop_scale, normalize=normalize
            )
            for blur_p, solarize_p in VIEW_PROBABILITIES
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.stack([view(image) for view in self.views])

    def __repr__(self) -> str:
        return f"BarlowTwinsPair({self.views[0]!r}, {self.views[1]!r})"
