"""The per-sample estimator (AdAdaGrad's own): gradients of single samples with ``torch.func``.

``vmap(grad(loss of one sample))`` over ``functional_call(model, (params, buffers), x[None])`` at
the current weights gives g_i for a bounded number of samples per rank, ``chunk_size`` at a time,
so memory stays at chunk_size x (model size). Each chunk is reduced at once to float64 sums, per
tensor T: sum_i g_i_T (a gradient-sized vector), sum_i ||g_i_T||^2 and, for the inner-product
variants, sum_i <g_i, g-bar>_T and sum_i <g_i, g-bar>_T^2. Over N samples (all ranks)::

    sum Var_i(g_i)           = (sum_i ||g_i||^2 - N ||g-bar||^2) / (N - 1)
    Var_i(<g_i, g-bar>_T)    = (sum_i <g_i, g-bar>_T^2 - (sum_i <g_i, g-bar>_T)^2 / N) / (N - 1)
    sum Var_i(o_i)_T         = sum Var_i(g_i)_T - Var_i(<g_i, g-bar>_T) / ||g-bar_T||^2

g-bar (the mean over all ranks' samples) is only known after every chunk has been seen, so the
inner-product variants take a second pass over the chunks (per-sample gradients computed again:
twice the cost, no N x model-size store). Reductions: one allreduce of 1 + T + P float64 values
per pass 1 (P = parameter count: g-bar must be global) and 2T values for pass 2.

BatchNorm, as AdAdaGrad's reference does it: its models are built with
``BatchNorm2d(track_running_stats=False)`` and run in training mode, so each sample is normalised
with its own statistics (a batch of one) and no running statistic changes. Here a BatchNorm
module in training mode is switched to ``track_running_stats=False`` for the duration of the
per-sample pass only (the model's running statistics are neither read nor written); in eval mode
the running statistics are used, and then the mean of the g_i is exactly the batch gradient.
With batch statistics it is not: a sample's gradient depends on which batch normalised it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .statistics import Moments


@contextmanager
def batch_norm_per_sample(model: nn.Module):
    """Training-mode BatchNorm layers normalise each sample by its own statistics and leave
    their running statistics alone (the reference's ``track_running_stats=False``)."""
    changed = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            changed.append((module, module.track_running_stats))
            module.track_running_stats = False
    try:
        yield
    finally:
        for module, flag in changed:
            module.track_running_stats = flag


def _sample_gradient_fn(model: nn.Module, loss_fn: Callable):
    def loss_of_one(params: dict, buffers: dict, x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (params, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    return vmap(grad(loss_of_one), in_dims=(None, None, 0, 0))


def _chunks(images: Tensor, labels: Tensor, max_samples: int, chunk_size: int):
    count = min(max_samples, images.shape[0])
    for start in range(0, count, chunk_size):
        stop = min(start + chunk_size, count)
        yield images[start:stop], labels[start:stop]


class PerSampleEstimator:
    """Per-sample statistics of one batch at the model's current weights.

    Args:
        model: the plain module (not a DDP/compile wrapper; its parameters are the weights used).
        loss_fn: mean-reduced loss ``loss_fn(output, labels)``.
        max_samples: samples per rank (the first ones of the batch).
        chunk_size: per-sample gradients computed at once.
        inner_products: also collect the inner-product / orthogonality statistics (second pass).
    """

    def __init__(self, model, loss_fn, max_samples=64, chunk_size=16, inner_products=False):
        if max_samples < 1 or chunk_size < 1:
            raise ValueError("max_samples and chunk_size must be >= 1")
        self.model, self.loss_fn = model, loss_fn
        self.max_samples, self.chunk_size = max_samples, chunk_size
        self.inner_products = inner_products

    def _state(self):
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        params = {n: p.detach() for n, p in named}
        buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        return [n for n, _ in named], params, buffers

    def _pass(self, images, labels, visit: Callable[[dict], None]) -> None:
        _, params, buffers = self._state()
        fn = _sample_gradient_fn(self.model, self.loss_fn)
        with batch_norm_per_sample(self.model):
            for x, y in _chunks(images, labels, self.max_samples, self.chunk_size):
                visit(fn(params, buffers, x, y))

    @torch.no_grad()
    def moments(self, images, labels, reduce_sum: Callable[[Tensor], Tensor] | None = None):
        """:class:`Moments` over the first ``max_samples`` of (images, labels) on every rank;
        ``reduce_sum`` sums a float64 tensor over ranks (None: one rank)."""
        reduce_sum = reduce_sum or (lambda t: t)
        names, params, _ = self._state()
        device = next(iter(params.values())).device
        total = {
            n: torch.zeros(p.numel(), dtype=torch.float64, device=device) for n, p in params.items()
        }
        sq = torch.zeros(len(names), dtype=torch.float64, device=device)
        count = torch.zeros(1, dtype=torch.float64, device=device)

        def first(grads: dict) -> None:
            count.add_(next(iter(grads.values())).shape[0])
            for t, name in enumerate(names):
                g = grads[name].flatten(1).to(torch.float64)
                total[name].add_(g.sum(0))
                sq[t] += (g * g).sum()

        self._pass(images, labels, first)
        flat = reduce_sum(torch.cat([count, sq, *total.values()]))
        n, sq = float(flat[0]), flat[1 : 1 + len(names)]
        gbar = dict(
            zip(names, torch.split(flat[1 + len(names) :] / n, [t.numel() for t in total.values()]))
        )
        gbar_sq = torch.stack([gbar[name].dot(gbar[name]) for name in names])
        return self._finish(images, labels, n, sq, gbar, gbar_sq, names, reduce_sum)

    def _finish(self, images, labels, n, sq, gbar, gbar_sq, names, reduce_sum) -> Moments:
        g2 = float(gbar_sq.sum())
        if n < 2:
            return Moments(math.nan, math.nan, math.nan, g2, math.nan, int(n))
        var_norm = (float(sq.sum()) - n * g2) / (n - 1)
        var_ip = var_orth = math.nan
        if self.inner_products:
            ips = torch.zeros(2, len(names), dtype=torch.float64, device=sq.device)

            def second(grads: dict) -> None:
                for t, name in enumerate(names):
                    ip = grads[name].flatten(1).to(torch.float64) @ gbar[name]
                    ips[0, t] += ip.sum()
                    ips[1, t] += (ip * ip).sum()

            self._pass(images, labels, second)
            ip_sum, ip_sq = reduce_sum(ips.flatten()).view(2, -1)
            var_ip_t = (ip_sq - ip_sum**2 / n) / (n - 1)
            var_g_t = (sq - n * gbar_sq) / (n - 1)
            safe = torch.where(gbar_sq > 0, gbar_sq, torch.ones_like(gbar_sq))
            orth_t = torch.where(gbar_sq > 0, var_g_t - var_ip_t / safe, var_g_t)
            var_ip, var_orth = float(var_ip_t.sum()), float(orth_t.sum())
        return Moments(var_norm, var_ip, var_orth, g2, math.nan, int(n))
