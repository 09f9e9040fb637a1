"""Metrics kept as device tensors (no host sync per step) and summed across ranks when read."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TrainMeter:
    """Running sums of loss x samples, correct top-1 predictions and samples on the device."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, loss: torch.Tensor, output: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.shape[0]
        correct = (output.argmax(dim=1) == labels).sum()
        count = torch.tensor(float(n), dtype=torch.float64, device=labels.device)
        self.sums += torch.stack([loss.detach().double() * n, correct.double(), count])

    def read_and_reset(self, dist) -> dict[str, float]:
        """Sum over ranks (one allreduce) and return mean loss and top-1 in percent."""
        loss_sum, correct, count = dist.allreduce_sum(self.sums).tolist()
        self.sums.zero_()
        count = max(count, 1.0)
        return {"loss": loss_sum / count, "top1": 100.0 * correct / count}


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
    """Whole-set loss (plain cross-entropy), top-1 and top-5 in percent.

    Each rank counts over its shard (disjoint, unpadded); one allreduce sums the counts.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, samples
    bad_paths: list[str] = []
    for images, labels, bad in loader:
        progress()
        bad_paths += bad
        if images is None:
            continue
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if prepare is not None:
            images = prepare(images)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            output = model(images).float()
        k = min(5, output.shape[1])
        hits = output.topk(k, dim=1).indices.eq(labels[:, None])
        sums += torch.stack(
            [
                F.cross_entropy(output, labels, reduction="sum").double(),
                hits[:, 0].sum().double(),
                hits.any(dim=1).sum().double(),
                torch.tensor(float(labels.shape[0]), dtype=torch.float64, device=device),
            ]
        )
    loss_sum, top1, top5, count = dist.allreduce_sum(sums).tolist()
    model.train()
    count = max(count, 1.0)
    return {
        "loss": loss_sum / count,
        "top1": 100.0 * top1 / count,
        "top5": 100.0 * top5 / count,
        "samples": int(count),
        "bad_paths": bad_paths,
    }
