"""Run under `mpirun -np 2 python tests/bt_two_ranks.py horovod|torch` (tests/test_barlowtwins.py).

Each rank holds half of a batch of 8 image pairs. With the backbone's and projector's BatchNorms
converted to global-batch statistics and c summed by the autograd-aware allreduce, the loss, and
the gradients averaged over ranks (what Horovod's DistributedOptimizer and DDP do), must equal
those of one process on the whole batch with plain BatchNorm, in float64. The running statistics
must agree too. With `detached=True` (the TVLARS repository's all_reduce) the averaged gradients
must be the exact ones divided by the world size. Last, one LARS step through the trainer's own
path (`lars.step.optimizer_step`, the backend's wrapped optimizer and model: Horovod's
DistributedOptimizer or DDP, whose gradient allreduces interleave with the loss's) must leave the
same parameters as one process's step. Prints "OK <backend>" on rank 0; exits 1 on a mismatch.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from lars.distributed import LocalBackend, init_distributed
from lars.optim import LARS
from lars.schedules import build_scheduler
from lars.step import StepContext, optimizer_step
from lars.tasks.barlowtwins import BarlowTwins, BarlowTwinsCriterion, SSLMeter, bt_param_groups
from lars.tasks.bt_loss import autograd_allreduce_sum, barlow_twins_loss, convert_batchnorm

BATCH, LAMBDA = 8, 0.0051


def tiny_model() -> BarlowTwins:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return BarlowTwins(backbone, 6, [12, 10]).double()


def loss_and_grads(model, y1, y2, allreduce, dist=None):
    z1, z2 = model(y1, y2)
    parts = barlow_twins_loss(z1, z2, LAMBDA, allreduce)
    model.zero_grad()
    parts.loss.backward()
    grads = []
    for param in model.parameters():
        grad = param.grad
        if dist is not None:  # the optimizer's average over ranks
            grad = dist.allreduce_sum(grad) / dist.size
        grads.append(grad)
    return parts.loss.detach(), grads


def trainer_step(model, pairs, dist) -> list[torch.Tensor]:
    """One optimizer_step of LARS with the original's groups; the parameters after it."""
    optimizer = LARS(bt_param_groups(model, 0.5, 0.05, 1e-4), lr=0.5, trust_coefficient=0.02)
    optimizer = dist.wrap_optimizer(optimizer, model, 1)
    scheduler = build_scheduler(optimizer, schedule="constant", total_steps=1, warmup_steps=0)
    criterion = BarlowTwinsCriterion(LAMBDA, autograd_allreduce_sum(dist))
    ctx = StepContext(
        dist.wrap_model(model), criterion, optimizer, scheduler, dist, torch.device("cpu"), 1
    )
    labels = torch.zeros(pairs.shape[0], dtype=torch.long)
    if not optimizer_step(ctx, iter([(pairs, labels, [])]), SSLMeter(criterion, "cpu"), []):
        raise RuntimeError("the step was skipped")
    return [param.detach().clone() for param in model.parameters()]


def check_trainer_step(dist, y1, y2, rows) -> list[str]:
    pairs = torch.stack([y1, y2], dim=1)  # (n, 2, 3, H, W), as BarlowTwinsPair batches are
    expected = trainer_step(tiny_model(), pairs, LocalBackend())
    got = trainer_step(convert_batchnorm(tiny_model(), dist), pairs[rows], dist)
    names = [name for name, _ in tiny_model().named_parameters()]
    return [
        f"trainer step: {name} off by {(a - b).abs().max().item():.3g}"
        for name, a, b in zip(names, got, expected)
        if not torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    ]


def main(backend: str) -> int:
    dist = init_distributed(backend)
    torch.manual_seed(1)
    y1, y2 = torch.randn(2, BATCH, 3, 5, 5, dtype=torch.float64).unbind()
    reference = tiny_model()
    ref_loss, ref_grads = loss_and_grads(reference, y1, y2, lambda t: t)

    rows = slice(dist.rank * BATCH // dist.size, (dist.rank + 1) * BATCH // dist.size)
    failures = []
    for detached in (False, True):
        model = convert_batchnorm(tiny_model(), dist)
        allreduce = autograd_allreduce_sum(dist, detached=detached)
        loss, grads = loss_and_grads(model, y1[rows], y2[rows], allreduce, dist)
        scale = 1.0 / dist.size if detached else 1.0
        if not torch.allclose(loss, ref_loss, rtol=1e-10, atol=1e-12):
            failures.append(f"detached={detached}: loss {loss.item()} != {ref_loss.item()}")
        for (name, _), grad, ref in zip(model.named_parameters(), grads, ref_grads):
            if not torch.allclose(grad, ref * scale, rtol=1e-8, atol=1e-12):
                error = (grad - ref * scale).abs().max().item()
                failures.append(f"detached={detached}: gradient of {name} off by {error:.3g}")
        ref_buffers = dict(reference.named_buffers())
        for name, buffer in model.named_buffers():
            if not torch.allclose(buffer.to(ref_buffers[name].dtype), ref_buffers[name]):
                failures.append(f"detached={detached}: buffer {name} differs")
    failures += check_trainer_step(dist, y1, y2, rows)
    for line in failures:
        print(f"rank {dist.rank}: {line}", flush=True)
    if dist.rank == 0 and not failures:
        print(f"OK {dist.name} loss {ref_loss.item():.6f}", flush=True)
    dist.shutdown()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
