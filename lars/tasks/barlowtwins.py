"""The Barlow Twins model: a backbone without its classifier, a projector, a final BatchNorm.

Zbontar et al. 2021 (arXiv:2103.03230), section 2 and appendix: a ResNet-50 whose classifier is
removed (2048-d features), a projector of three linear layers of 8192 units, the first two followed
by BatchNorm1d and ReLU, all without biases, and a BatchNorm1d without affine parameters applied to
each view's embedding before the cross-correlation (`lars.tasks.bt_loss`).

Here the backbone is any model `lars.models.build_model` builds. Its classifier (the last Linear
producing the class scores) is replaced by an identity, and the projector's input width is that
Linear's input width, checked by a dummy forward pass: the TVLARS repository hard-coded 512, right
for ResNet-18 only.

    model = build_barlow_twins("resnet18_small", projector="2048-2048-2048")
    z1, z2 = model(view1, view2)       # (n, 2048) each, batch-normalised, no affine
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lars.metrics import DeviceCounters
from lars.models import build_model
from lars.param_groups import param_groups
from lars.tasks.bt_loss import DEFAULT_LAMBDA, BarlowTwinsLossParts, barlow_twins_loss

__all__ = [
    "BarlowTwins",
    "BarlowTwinsCriterion",
    "SSLMeter",
    "bt_param_groups",
    "build_barlow_twins",
    "headless_backbone",
    "parse_projector",
]

DEFAULT_PROJECTOR = "8192-8192-8192"
_SENTINEL_CLASSES = 9973  # a class count no hidden layer of a torchvision model has


def parse_projector(spec: str) -> list[int]:
    """'8192-8192-8192' -> [8192, 8192, 8192]; ValueError naming --projector otherwise."""
    try:
        widths = [int(part) for part in str(spec).split("-")]
    except ValueError:
        widths = []
    if not widths or any(width <= 0 for width in widths):
        raise ValueError(
            f"--projector {spec!r}: expected positive layer widths joined by '-', "
            "e.g. 8192-8192-8192"
        )
    return widths


def build_projector(in_features: int, widths: list[int]) -> nn.Sequential:
    """Linear(no bias)-BatchNorm1d-ReLU for every width but the last, then Linear(no bias)."""
    layers: list[nn.Module] = []
    sizes = [in_features, *widths]
    for width_in, width_out in zip(sizes[:-2], sizes[1:-1]):
        layers += [
            nn.Linear(width_in, width_out, bias=False),
            nn.BatchNorm1d(width_out),
            nn.ReLU(inplace=True),
        ]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return nn.Sequential(*layers)


def _parent_and_name(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    parent_path, _, name = qualified.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


@torch.no_grad()
def _feature_width(backbone: nn.Module, image_size: int) -> int:
    was_training = backbone.training
    backbone.eval()  # BatchNorm statistics must not move, and a batch of 2 is enough
    probe = next(backbone.parameters()).new_zeros(2, 3, image_size, image_size)
    features = backbone(probe)
    backbone.train(was_training)
    if features.dim() != 2:
        raise ValueError(f"the backbone's features have shape {tuple(features.shape)}, not (n, d)")
    return features.shape[1]


def headless_backbone(name: str, image_size: int = 32) -> tuple[nn.Module, int]:
    """(backbone with its classifier replaced by nn.Identity, its feature width).

    The classifier is the last nn.Linear with the model's class count as its output width (the
    model is built with an unusual count so that no other layer matches): `fc` of a ResNet,
    `classifier[-1]` of VGG, MobileNet or EfficientNet, `heads.head` of a ViT, `head` of Swin.
    The width is that Linear's `in_features`, and a dummy forward at `image_size` must agree.
    ValueError naming --model when no such Linear exists (SqueezeNet's classifier is a conv).
    """
    model = build_model(name, num_classes=_SENTINEL_CLASSES)
    heads = [
        qualified
        for qualified, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.out_features == _SENTINEL_CLASSES
    ]
    if not heads:
        raise ValueError(f"--model {name!r} has no linear classifier that Barlow Twins can remove")
    parent, attribute = _parent_and_name(model, heads[-1])
    width = getattr(parent, attribute).in_features
    setattr(parent, attribute, nn.Identity())
    try:
        measured = _feature_width(model, image_size)
    except (RuntimeError, AssertionError) as error:  # e.g. a ViT's fixed input size
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"--model {name!r} cannot run on {image_size} px images: {first}"
        ) from None
    if measured != width:
        raise ValueError(
            f"--model {name!r}: features of width {measured} reach the removed classifier, "
            f"which took {width}"
        )
    return model, width


class BarlowTwins(nn.Module):
    """backbone -> projector -> BatchNorm1d(affine=False), applied to each view separately.

    `forward(y1, y2)` returns the two normalised embeddings (n, D); each view has its own batch
    statistics, as in the original. `features(x)` is the backbone alone (the linear probe's and
    the k-NN monitor's input).
    """

    def __init__(self, backbone: nn.Module, feature_width: int, widths: list[int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_width = feature_width
        self.projector = build_projector(feature_width, widths)
        self.bn = nn.BatchNorm1d(widths[-1], affine=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.projector(self.backbone(x)))

    channels_last = False  # set by the trainer: the views are laid out after the split

    def forward(
        self, y1: torch.Tensor, y2: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(BN(z1), BN(z2)) of two view batches, or of one (n, 2, 3, H, W) batch of pairs
        (what `BarlowTwinsPair` and the trainer's step give)."""
        if y2 is None:
            if y1.dim() != 5 or y1.shape[1] != 2:
                raise ValueError(
                    f"expected a (n, 2, C, H, W) batch of pairs, got {tuple(y1.shape)}"
                )
            y1, y2 = y1.unbind(1)
        if self.channels_last:
            y1 = y1.contiguous(memory_format=torch.channels_last)
            y2 = y2.contiguous(memory_format=torch.channels_last)
        return self.embed(y1), self.embed(y2)


class BarlowTwinsCriterion:
    """`loss_fn(output, labels)` of the trainer's step: output is the model's (z1, z2), labels
    are ignored. Keeps the last call's on/off-diagonal terms for `SSLMeter`."""

    def __init__(self, lambd: float = DEFAULT_LAMBDA, allreduce=None, global_batch=None):
        self.lambd, self.global_batch = lambd, global_batch
        self.allreduce = allreduce if allreduce is not None else (lambda t: t)
        self.last: BarlowTwinsLossParts | None = None

    def __call__(self, output, labels=None) -> torch.Tensor:
        z1, z2 = output
        self.last = barlow_twins_loss(z1, z2, self.lambd, self.allreduce, self.global_batch)
        return self.last.loss


class SSLMeter:
    """The step's meter for Barlow Twins: loss, on- and off-diagonal terms, on the device."""

    def __init__(self, criterion: BarlowTwinsCriterion, device) -> None:
        self.criterion = criterion
        self.counters = DeviceCounters(("loss", "on_diag", "off_diag", "steps"), device)

    @torch.no_grad()
    def update(self, loss: torch.Tensor, output=None, labels=None) -> None:
        parts = self.criterion.last
        self.counters.add(loss=loss, on_diag=parts.on_diag, off_diag=parts.off_diag, steps=1)

    def read_and_reset(self, dist) -> dict[str, float]:
        """Means since the last read, averaged over ranks (every rank holds the same loss)."""
        sums = self.counters.read(dist)
        count = max(sums.pop("steps"), 1.0)
        return {name: value / count for name, value in sums.items()}

    @staticmethod
    def tags(stats: dict) -> dict[str, float]:
        """TensorBoard's scalars of `read_and_reset`'s figures (the trainer's log_train)."""
        return {f"ssl/{name}": value for name, value in stats.items()}

    @staticmethod
    def summary(stats: dict) -> str:
        return (
            f"loss {stats['loss']:.4f} (on-diag {stats['on_diag']:.4f}, "
            f"off-diag {stats['off_diag']:.4f})"
        )


def bt_param_groups(
    model: nn.Module, weight_lr: float, norm_bias_lr: float, weight_decay: float
) -> list[dict]:
    """The original's LARS groups: weights decayed and adapted at `weight_lr`; biases and
    normalisation parameters neither, at `norm_bias_lr` (0.2 and 0.0048 x global batch / 256)."""
    groups = param_groups(model, weight_decay)
    for group in groups:
        group["lr"] = weight_lr if group["layer_adaptation"] else norm_bias_lr
    return groups


def build_barlow_twins(
    model: str, projector: str = DEFAULT_PROJECTOR, image_size: int = 32
) -> BarlowTwins:
    """The Barlow Twins model over backbone `model` (any `lars.models.build_model` name)."""
    widths = parse_projector(projector)
    backbone, width = headless_backbone(model, image_size)
    return BarlowTwins(backbone, width, widths)
