"""Model construction: any torchvision classification model, plus small-image ResNet variants.

`build_model("resnet50", num_classes=1000)` is torchvision's ResNet-50 with random weights (nothing
is downloaded). The `*_small` variants (`resnet18_small`, `resnet34_small`, `resnet50_small`)
replace the 7x7 stride-2 stem and the max-pool with a 3x3 stride-1 convolution, the usual change for
32-64 px inputs (CIFAR, Tiny ImageNet, the bundled sample set): without it a 32 px image is 1x1
after the stem. `tinycnn` is a four-layer network without normalisation, used by smoke tests and
by the exactness tests of gradient accumulation (BatchNorm statistics depend on how a batch is
split, so exactness can only be checked without it).
"""

from __future__ import annotations

import torch.nn as nn
import torchvision

SMALL_IMAGE_VARIANTS = ("resnet18_small", "resnet34_small", "resnet50_small")
EXTRA_MODELS = (*SMALL_IMAGE_VARIANTS, "tinycnn", "alexnet_bn")


def available_models() -> list[str]:
    """Every name `build_model` accepts."""
    names = torchvision.models.list_models(module=torchvision.models)
    return sorted(set(names) | set(EXTRA_MODELS))


def _small_stem(model: nn.Module) -> nn.Module:
    width = model.conv1.out_channels
    model.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class TinyCNN(nn.Module):
    """conv(32)-relu-pool, conv(64)-relu-pool, 4x4 average pool, linear. No normalisation."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),  # keeps where strokes are: digits need it
            nn.Flatten(),
        )
        self.fc = nn.Linear(64 * 16, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def build_model(name: str, num_classes: int) -> nn.Module:
    """Build `name` with `num_classes` outputs and random weights. Raises ValueError if unknown."""
    if name == "tinycnn":
        return TinyCNN(num_classes)
    if name == "alexnet_bn":  # the SystemDS LARS comparison's model (lars/alexnet_bn.py)
        from lars.alexnet_bn import alexnet_bn

        return alexnet_bn(num_classes)
    if name in SMALL_IMAGE_VARIANTS:
        base = name.removesuffix("_small")
        model = torchvision.models.get_model(base, weights=None, num_classes=num_classes)
        return _small_stem(model)
    if name not in available_models():
        raise ValueError(
            f"unknown model {name!r}; choose a torchvision classification model "
            f"(e.g. resnet50) or one of {', '.join(EXTRA_MODELS)}"
        )
    kwargs = {"num_classes": num_classes}
    if name.startswith("inception") or name.startswith("googlenet"):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True
    return torchvision.models.get_model(name, weights=None, **kwargs)
