"""The Barlow Twins loss over the global batch, with exact gradients on any number of ranks.

Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction"
(arXiv:2103.03230), eq. 1-2. With z1, z2 the projector's outputs for the two views of a global
batch of N images, each normalised per dimension over the batch (mean 0, variance 1, no affine),

    c_ij = sum_b z1_bi z2_bj / N                                 (the cross-correlation, D x D)
    L    = sum_i (1 - c_ii)^2  +  lambda * sum_i sum_{j != i} c_ij^2     lambda = 0.0051

On W ranks each holds N / W rows. c is the sum over ranks of each rank's z1^T z2 / N, through an
allreduce that autograd sees: its backward sums the incoming gradient over ranks, so every rank
back-propagates W x dL/d(its rows), and the optimizer's average over ranks gives exactly dL/dtheta
of one process on the concatenated batch. The TVLARS repository summed c with an in-place
`torch.distributed.all_reduce`, which autograd does not see: each rank then gets only its own
rows' share, and the average is dL/dtheta / W (`detached=True` reproduces that, for comparison).

The per-dimension normalisation needs the global batch's statistics too (otherwise 2 ranks
compute a different loss from 1 rank on the same images): `GlobalBatchNorm` computes them with
the same autograd-aware allreduce, and `convert_batchnorm` swaps it in for every BatchNorm of a
model. Horovod's and torch's SyncBatchNorm do the same with fused kernels but only on CUDA
(both raise on CPU tensors); `convert_batchnorm(..., native=True)` picks them on a GPU.

This module imports neither Horovod nor torch.distributed at import time: `autograd_allreduce_sum`
takes a `lars.distributed` backend (or any callable) and returns the sum-over-ranks function.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "BarlowTwinsLossParts",
    "GlobalBatchNorm",
    "autograd_allreduce_sum",
    "barlow_twins_loss",
    "convert_batchnorm",
    "local_batchnorm",
]

AllreduceSum = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_LAMBDA = 0.0051  # the original's; the TVLARS repository uses 0.005


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _detached(allreduce: AllreduceSum) -> AllreduceSum:
    """Sum over ranks in the forward pass, the local tensor's gradient only in the backward
    pass: what an in-place, autograd-blind all_reduce does (the TVLARS repository's c)."""

    def blind(tensor: torch.Tensor) -> torch.Tensor:
        others = allreduce(tensor.detach()) - tensor.detach()
        return tensor + others

    return blind


def autograd_allreduce_sum(dist=None, *, detached: bool = False) -> AllreduceSum:
    """The function x -> sum over ranks of x, differentiable (its backward is the same sum).

    `dist` is a `lars.distributed` backend (`name` "local", "horovod" or "torch"), None (one
    process), or already such a callable (returned as is, e.g. a test's). Horovod's
    `hvd.allreduce` and `torch.distributed.nn.functional.all_reduce` are autograd functions
    whose backward allreduces the gradient. `detached=True`: see `_detached`.
    """
    if callable(dist) and not hasattr(dist, "name"):
        function = dist
    elif dist is None or dist.size == 1:
        return _identity  # nothing to sum; detached makes no difference on one rank
    elif dist.name == "horovod":
        hvd = dist.hvd

        def function(tensor: torch.Tensor) -> torch.Tensor:
            return hvd.allreduce(tensor, op=hvd.Sum)

    elif dist.name == "torch":
        from torch.distributed.nn.functional import all_reduce

        def function(tensor: torch.Tensor) -> torch.Tensor:
            # Marked deprecated (torch 2.x points to _functional_collectives); kept because it
            # is the documented differentiable collective: its backward sums the gradients.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return all_reduce(tensor)  # ReduceOp.SUM

    else:
        raise ValueError(f"no autograd allreduce for distributed backend {dist.name!r}")
    return _detached(function) if detached else function


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm over the rows of all ranks, exact in value and gradient on CPU and GPU.

    Training: with n_r rows on rank r and N = sum_r n_r,
        mean = sum_r sum_b x_b / N,   var = sum_r sum_b (x_b - mean)^2 / N   (per channel)
        y = (x - mean) / sqrt(var + eps) * weight + bias
    both sums through `allreduce` (two allreduces per call: the count and sum, then the squared
    deviations, which is numerically safer than E[x^2] - mean^2). Running statistics follow
    torch's rule (unbiased variance, N / (N - 1)) from the global figures, so they are the same
    on every rank. Evaluation uses them and no communication. Any input (N, C, ...), so one class
    replaces BatchNorm1d, 2d and 3d. A subclass of _BatchNorm: `lars.param_groups` treats its
    parameters as normalisation parameters.
    """

    def __init__(self, num_features: int, allreduce: AllreduceSum = _identity, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.allreduce = allreduce

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training or self.running_mean is None):
            return F.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                self.eps,
            )  # fmt: skip
        x = input.to(torch.promote_types(input.dtype, torch.float32))
        dims = [0, *range(2, x.dim())]
        local_count = x.numel() // x.shape[1]
        stats = self.allreduce(torch.cat([x.new_full((1,), local_count), x.sum(dims)]))
        count, mean = stats[0].detach(), stats[1:] / stats[0].detach()
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = x - mean.view(shape)
        var = self.allreduce(centred.pow(2).sum(dims)) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), count)
        return y.to(input.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        self.num_batches_tracked += 1
        momentum = self.momentum
        if momentum is None:  # cumulative moving average, as torch's
            momentum = 1.0 / float(self.num_batches_tracked)
        unbiased = var * count / (count - 1).clamp(min=1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def _global_twin(module: _BatchNorm, allreduce: AllreduceSum) -> GlobalBatchNorm:
    twin = GlobalBatchNorm(
        module.num_features,
        allreduce,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
    )
    like = module.weight if module.weight is not None else module.running_mean
    if like is not None:  # the same device and float type (a float64 model stays float64)
        twin.to(device=like.device, dtype=like.dtype)
    twin.load_state_dict(module.state_dict())
    return twin


def convert_batchnorm(model: nn.Module, dist=None, *, native: bool = False) -> nn.Module:
    """Every BatchNorm of `model` with statistics over all ranks; unchanged on one rank.

    `dist`: a `lars.distributed` backend, or an allreduce callable (`autograd_allreduce_sum`).

    Default: `GlobalBatchNorm` (exact, any device). `native=True` on CUDA: Horovod's
    `hvd.SyncBatchNorm` under Horovod, torch's `nn.SyncBatchNorm` under torch.distributed
    (their fused kernels; CUDA only). State (weights, running statistics) is carried over.
    """
    if dist is None or getattr(dist, "size", 2) == 1:
        return model
    native = native and hasattr(dist, "name")  # a bare allreduce callable has no native kind
    if native and dist.name == "torch":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    allreduce = autograd_allreduce_sum(dist)
    for name, child in model.named_children():
        if isinstance(child, _BatchNorm) and not isinstance(child, GlobalBatchNorm):
            if native and dist.name == "horovod":
                replacement = dist.hvd.SyncBatchNorm(
                    child.num_features, child.eps, child.momentum, child.affine,
                    child.track_running_stats,
                )  # fmt: skip
                replacement.load_state_dict(child.state_dict())
            else:
                replacement = _global_twin(child, allreduce)
            setattr(model, name, replacement)
        else:
            convert_batchnorm(child, dist, native=native)
    return model


def local_batchnorm(model: nn.Module) -> nn.Module:
    """Make every `GlobalBatchNorm` of `model` use this rank's rows only (in place).

    For a copy of the backbone in the TVLARS-compatible probe, which runs BatchNorm in training
    mode: there the ranks' validation shards may hold different numbers of batches, and a
    collective in the forward pass would wait forever for the rank that has finished.
    """
    for module in model.modules():
        if isinstance(module, GlobalBatchNorm):
            module.allreduce = _identity
    return model


@dataclass
class BarlowTwinsLossParts:
    """The loss and its two terms (for `ssl/on_diag`, `ssl/off_diag`); `loss` carries grad."""

    loss: torch.Tensor
    on_diag: torch.Tensor  # sum_i (1 - c_ii)^2, detached
    off_diag: torch.Tensor  # sum_{i != j} c_ij^2 (before lambda), detached


def _off_diagonal(c: torch.Tensor) -> torch.Tensor:
    """The D(D-1) entries c_ij, i != j, as a flat view: dropping the last entry of the flattened
    matrix and reading it in rows of D + 1 puts each diagonal entry first in its row."""
    d = c.shape[0]
    return c.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


def barlow_twins_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    lambd: float = DEFAULT_LAMBDA,
    allreduce: AllreduceSum = _identity,
    global_batch: int | None = None,
) -> BarlowTwinsLossParts:
    """L of the module docstring from this rank's rows of the normalised embeddings.

    `z1`, `z2`: (n, D), already normalised over the global batch (the model's final
    BatchNorm1d without affine). `global_batch`: N; by default the allreduced row count.
    Computed in at least float32 whatever the autocast dtype (c sums N products).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(
            f"embeddings must be two (n, D) tensors of one shape: {z1.shape}, {z2.shape}"
        )
    dtype = torch.promote_types(z1.dtype, torch.float32)  # float64 stays float64 (tests)
    z1, z2 = z1.to(dtype), z2.to(dtype)
    if global_batch is None:
        global_batch = int(allreduce(z1.new_full((1,), z1.shape[0]).detach()).item())
    with torch.autocast(z1.device.type, enabled=False):
        c = allreduce(z1.T @ z2) / global_batch
    on_diag = (1.0 - torch.diagonal(c)).pow(2).sum()
    off_diag = _off_diagonal(c).pow(2).sum()
    loss = on_diag + lambd * off_diag
    return BarlowTwinsLossParts(loss, on_diag.detach(), off_diag.detach())
