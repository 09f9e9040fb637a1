"""Metrics as device-side counters: nothing crosses to the host until they are read.

A GPU step queues kernels and returns; any host<->device transfer in the step (`.item()`,
`float(t)`, or a tensor built from a Python number with `torch.tensor(n, device=...)`) makes the
host wait for the queue to drain, or adds a blocking copy. So counters are float64 tensors on the
device, increased with device tensors (loss, correct predictions) and with Python numbers passed
as kernel scalars (sample counts, which never become tensors); `read()` sums them over ranks
with one allreduce and copies them to the host once, at each log interval or validation end.

Whole-set validation (DistributedSampler pads; pytorch#25162): each rank counts over a disjoint,
unpadded shard, and the counts, not per-rank averages, are summed:

    loss = sum_i CE(x_i, y_i) / N,   top-k = 100 * #{i : y_i among the k largest logits of x_i} / N

And the model scored is the model saved: BatchNorm running statistics, which every rank
accumulates over its own shard of the training data, are averaged over ranks before every
validation and checkpoint (`average_batchnorm_statistics`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DeviceCounters",
    "TrainMeter",
    "average_batchnorm_statistics",
    "evaluate",
    "topk_correct",
]


class DeviceCounters:
    """Named float64 sums on `device`. `add()` never synchronises; `read()` does once."""

    def __init__(self, names: Sequence[str], device: torch.device | str) -> None:
        self.names = tuple(names)
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        self._index = {name: i for i, name in enumerate(self.names)}

    def add(self, **values: torch.Tensor | float) -> None:
        """Add device tensors (0-dim) or Python numbers to the named counters."""
        for name, value in values.items():
            counter = self.sums[self._index[name]]  # a view: the add is in place
            if isinstance(value, torch.Tensor):
                counter.add_(value.detach().to(torch.float64))
            else:
                counter.add_(value)  # a kernel scalar, not a host-to-device copy

    def read(self, dist=None, reset: bool = True) -> dict[str, float]:
        """Sum over ranks (one allreduce when `dist` is given), copy to the host, reset."""
        sums = dist.allreduce_sum(self.sums) if dist is not None else self.sums.clone()
        values = dict(zip(self.names, sums.tolist()))
        if reset:
            self.sums.zero_()
        return values


@torch.no_grad()
def topk_correct(output: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """Per k (capped at the number of classes): how many labels are among the k largest logits,
    as a float64 device tensor of len(ks)."""
    top = output.topk(min(max(ks), output.shape[1]), dim=1).indices.eq(labels[:, None])
    return torch.stack([top[:, : min(k, output.shape[1])].any(dim=1).sum() for k in ks]).double()


class TrainMeter:
    """Training loss x samples, correct top-1 predictions and samples, on the device."""

    def __init__(self, device: torch.device | str) -> None:
        self.counters = DeviceCounters(("loss_sum", "correct", "samples"), device)

    @torch.no_grad()
    def update(self, loss: torch.Tensor, output: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.shape[0]
        correct = (output.argmax(dim=1) == labels).sum()
        self.counters.add(loss_sum=loss.detach().double() * n, correct=correct, samples=n)

    def read_and_reset(self, dist) -> dict[str, float]:
        """Sum over ranks (one allreduce); mean loss and top-1 in percent since the last read."""
        sums = self.counters.read(dist)
        count = max(sums["samples"], 1.0)
        return {"loss": sums["loss_sum"] / count, "top1": 100.0 * sums["correct"] / count}

    @staticmethod
    def tags(stats: dict) -> dict[str, float]:
        """TensorBoard's scalars of `read_and_reset`'s figures."""
        return {"train/loss": stats["loss"], "train/top1": stats["top1"]}

    @staticmethod
    def summary(stats: dict) -> str:
        return f"loss {stats['loss']:.4f} top1 {stats['top1']:.2f}%"


def _batchnorm_buffers(model: nn.Module) -> list[torch.Tensor]:
    found = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            if module.running_mean is not None:
                found += [module.running_mean, module.running_var]
    return found


@torch.no_grad()
def average_batchnorm_statistics(model: nn.Module, dist) -> None:
    """Replace every BatchNorm running mean and variance by its mean over ranks.

    Each rank updates its running statistics from its own shard; without this, validation
    scores every rank's shard with a different model and the checkpoint holds rank 0's
    statistics only. One allreduce (float64 sums, divided by the world size) for all buffers,
    in `model.modules()` order, which is the same on every rank; every rank ends with the same
    values. Averaging the variances (rather than pooling them with the between-rank spread of
    the means) is the choice of timm's `distribute_bn` and of DDP's buffer broadcast-free
    setups; it keeps the estimate each rank made of the same population. Collective: every
    rank must call it at the same point. A no-op on one rank.
    """
    if dist.size == 1:
        return
    buffers = _batchnorm_buffers(model)
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).to(torch.float64) for b in buffers])
    flat = dist.allreduce_sum(flat) / dist.size
    offset = 0
    for buffer in buffers:
        n = buffer.numel()
        buffer.copy_(flat[offset : offset + n].view_as(buffer))
        offset += n


def _to_device(images, labels, device, prepare, channels_last):
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    if prepare is not None:
        images = prepare(images)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    dist,
    device: torch.device,
    progress=lambda: None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    prepare=None,
) -> dict[str, float]:
    """Whole-set loss (plain cross-entropy), top-1 and top-5 in percent, and the sample count.

    `loader` yields (images, labels, unreadable paths); each rank counts over its shard and one
    allreduce sums the counts. Call `average_batchnorm_statistics` first so every rank scores
    with the same model.
    """
    was_training = model.training
    model.eval()
    counters = DeviceCounters(("loss_sum", "top1", "top5", "samples"), device)
    bad_paths: list[str] = []
    for images, labels, bad in loader:
        progress()
        bad_paths += bad
        if images is None:
            continue
        images, labels = _to_device(images, labels, device, prepare, channels_last)
        with torch.autocast(
            device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            output = model(images).float()
        top1, top5 = topk_correct(output, labels).unbind()
        loss_sum = F.cross_entropy(output, labels, reduction="sum")
        counters.add(loss_sum=loss_sum, top1=top1, top5=top5, samples=labels.shape[0])
    sums = counters.read(dist)
    model.train(was_training)
    count = max(sums["samples"], 1.0)
    return {
        "loss": sums["loss_sum"] / count,
        "top1": 100.0 * sums["top1"] / count,
        "top5": 100.0 * sums["top5"] / count,
        "samples": int(sums["samples"]),
        "bad_paths": bad_paths,
    }
