"""Linear evaluation of a pre-trained backbone: a linear classifier on frozen features.

The protocol of Barlow Twins (Zbontar et al. 2021, arXiv:2103.03230, section 4, and its
repository's evaluate.py): the backbone's weights are frozen and it runs in eval mode (BatchNorm
uses its running statistics, which do not change); a linear layer (weights ~ N(0, 0.01^2), bias 0)
is trained with SGD, lr 0.3, momentum 0.9, weight decay 1e-6, cross-entropy, the learning rate
annealed by a cosine over the epochs (lr_e = lr 0.5 (1 + cos(pi e / epochs))); training crops are
random resized crops with flips, validation crops are centre crops, and top-1/top-5 are counted
over the whole validation set on every rank and summed (`lars.metrics`).

`ProbeConfig.tvlars_compatible()` reproduces the TVLARS repository's probe, for comparing with
its published numbers only: the backbone is never switched to eval mode (BatchNorm normalises
with batch statistics and its running statistics drift during the probe), validation images get
random crops, and the weight decay is 5e-4.

    probe, optimizer, scheduler = build_probe(backbone, width, classes, ProbeConfig(epochs=100))
    for epoch in range(100):
        train_probe_epoch(probe, optimizer, train_loader, dist, device)
        scheduler.step()
    metrics = evaluate_probe(probe, val_loader, dist, device)      # {"top1", "top5", ...}
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms

from lars.data.fast import IMAGENET_MEAN, IMAGENET_STD
from lars.metrics import DeviceCounters, topk_correct

__all__ = [
    "LinearProbe",
    "ProbeConfig",
    "build_probe",
    "evaluate_probe",
    "probe_transforms",
    "run_linear_probe",
    "train_probe_epoch",
]


@dataclass(frozen=True)
class ProbeConfig:
    epochs: int = 100
    lr: float = 0.3
    momentum: float = 0.9
    weight_decay: float = 1e-6
    backbone_eval_mode: bool = True  # False: the TVLARS repository's quirk
    random_val_crops: bool = False  # True: the TVLARS repository's quirk

    @classmethod
    def tvlars_compatible(cls, **overrides) -> ProbeConfig:
        """The TVLARS repository's probe: no eval mode, random test crops, weight decay 5e-4."""
        quirks = dict(backbone_eval_mode=False, random_val_crops=True, weight_decay=5e-4)
        return replace(cls(), **{**quirks, **overrides})


def probe_transforms(
    image_size: int,
    config: ProbeConfig,
    crop_ratio: float = 1.0,
    min_crop_scale: float = 0.08,
    hflip: bool = True,
):
    """(train, val) transforms: random resized crop (area `min_crop_scale`-1) + flip; resize +
    centre crop (`crop_ratio` 0.875 for ImageNet's 224 of 256, 1.0 for 32-64 px sets). The
    defaults are the original's ImageNet crops; the trainer passes its dataset's --min-crop-scale
    and --hflip (the sample set's digits: 0.35, no flips). Random val crops if configured."""
    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    crop = transforms.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0))
    flip = [transforms.RandomHorizontalFlip()] if hflip else []
    train = transforms.Compose([crop, *flip, *normalize])
    if config.random_val_crops:
        return train, train
    resize = int(round(image_size / crop_ratio))
    val = transforms.Compose(
        [transforms.Resize(resize), transforms.CenterCrop(image_size), *normalize]
    )
    return train, val


class LinearProbe(nn.Module):
    """A frozen backbone (no gradients, eval mode unless configured otherwise) and a linear head."""

    def __init__(self, backbone: nn.Module, width: int, num_classes: int, eval_mode: bool = True):
        super().__init__()
        self.backbone, self.backbone_eval_mode = backbone, eval_mode
        self.head = nn.Linear(width, num_classes)
        nn.init.normal_(self.head.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.head.bias)
        for param in self.backbone.parameters():
            param.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        # The backbone's mode never follows the probe's: always eval (the protocol), or always
        # train (the TVLARS repository never called eval()).
        self.backbone.train(not self.backbone_eval_mode)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.backbone(images)
        return self.head(features.float())


def build_probe(backbone: nn.Module, width: int, num_classes: int, config: ProbeConfig):
    """(probe, SGD over the head only, cosine over `config.epochs`, stepped once per epoch)."""
    probe = LinearProbe(backbone, width, num_classes, config.backbone_eval_mode)
    optimizer = torch.optim.SGD(
        probe.head.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))
    return probe, optimizer, scheduler


def _batches(loader, device, prepare):
    """(images, labels) on `device` from loaders yielding (images, labels[, unreadable paths])."""
    for batch in loader:
        images, labels = batch[0], batch[1]
        if images is None:  # every file of the batch was unreadable
            continue
        images = images.to(device, non_blocking=True)
        if prepare is not None:
            images = prepare(images)
        yield images, labels.to(device, non_blocking=True)


def _average_gradients(parameters, dist) -> None:
    if dist is None or dist.size == 1:
        return
    for param in parameters:
        param.grad = dist.allreduce_sum(param.grad) / dist.size


def train_probe_epoch(
    probe: LinearProbe, optimizer, loader, dist, device, prepare=None, after_batch=None
) -> dict[str, float]:
    """One epoch of the head: cross-entropy, gradients averaged over ranks, one SGD step per
    batch. Returns the mean training loss and top-1 (percent) over all ranks' samples, and
    "stopped": whether `after_batch()` (called on every rank after each step) returned True,
    which ends the epoch there (a preemption; the trainer checkpoints and resumes it)."""
    stopped = False
    probe.train()
    counters = DeviceCounters(("loss_sum", "correct", "samples"), device)
    for images, labels in _batches(loader, device, prepare):
        output = probe(images)
        loss = F.cross_entropy(output, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _average_gradients(probe.head.parameters(), dist)
        optimizer.step()
        n = labels.shape[0]
        correct = (output.detach().argmax(dim=1) == labels).sum()
        counters.add(loss_sum=loss.detach() * n, correct=correct, samples=n)
        if after_batch is not None and after_batch():
            stopped = True
            break
    sums = counters.read(dist)
    count = max(sums["samples"], 1.0)
    top1 = 100.0 * sums["correct"] / count
    return {"loss": sums["loss_sum"] / count, "top1": top1, "stopped": stopped}


@torch.no_grad()
def evaluate_probe(probe: LinearProbe, loader, dist, device, prepare=None) -> dict[str, float]:
    """Whole-set loss, top-1 and top-5 (percent): each rank counts its unpadded shard
    (`lars.data.loaders.ShardSampler`) and the counts are summed over ranks."""
    probe.eval()
    counters = DeviceCounters(("loss_sum", "top1", "top5", "samples"), device)
    for images, labels in _batches(loader, device, prepare):
        output = probe(images).float()
        top1, top5 = topk_correct(output, labels).unbind()
        loss_sum = F.cross_entropy(output, labels, reduction="sum")
        counters.add(loss_sum=loss_sum, top1=top1, top5=top5, samples=labels.shape[0])
    sums = counters.read(dist)
    probe.train()
    count = max(sums["samples"], 1.0)
    return {
        "loss": sums["loss_sum"] / count,
        "top1": 100.0 * sums["top1"] / count,
        "top5": 100.0 * sums["top5"] / count,
        "samples": int(sums["samples"]),
    }


def run_linear_probe(
    backbone: nn.Module,
    width: int,
    num_classes: int,
    train_loader,
    val_loader,
    dist,
    device,
    config: ProbeConfig = ProbeConfig(),  # noqa: B008 (frozen)
    prepare=None,
    on_epoch=None,
) -> dict[str, float]:
    """The whole second stage; `on_epoch(epoch, train_metrics)` after each epoch (logging).
    `train_loader.sampler.set_epoch(e)` is called when the sampler has it. Returns the final
    validation metrics."""
    probe, optimizer, scheduler = build_probe(backbone, width, num_classes, config)
    probe.to(device)
    for epoch in range(config.epochs):
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        metrics = train_probe_epoch(probe, optimizer, train_loader, dist, device, prepare)
        scheduler.step()
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return evaluate_probe(probe, val_loader, dist, device, prepare)
