"""The micro-batch estimator: the gradients training computes anyway are the samples.

One optimizer step averages n = ranks x batches-per-allreduce micro-batch gradients g_j, each the
mean over b images. With S = (1/n) sum_j ||g_j||^2 and g-bar their mean (the averaged gradient
after synchronisation), McCandlish et al. (2018, "An Empirical Model of Large-Batch Training",
App. A.1) give unbiased estimates of the per-sample covariance trace and of the true gradient::

    tr Sigma = b n (S - ||g-bar||^2) / (n - 1)        |G|^2 = (n ||g-bar||^2 - S) / (n - 1)

A micro-batch mean of b i.i.d. samples has b times less variance than one sample, so every
statistic of the per-sample tests is b x the same sample variance over the n micro-batch means
(tr Sigma is that statement for the norm test). Per tensor T::

    Var_j(<g_j, u>_T) = (sum_j <g_j, u>_T^2 - (sum_j <g_j, u>_T)^2 / n) / (n - 1)
    sum Var_j(o_j)_T  = (sum_j ||g_j_T||^2 - n ||g-bar_T||^2) / (n - 1)
                        - Var_j(<g_j, u>_T) / ||u_T||^2

How the pieces arrive: a tensor hook (``Tensor.register_hook``) on every parameter sees the
incoming gradient of each backward pass *before* it is accumulated into ``p.grad`` and before
Horovod's accumulator hook or DDP's reducer reduce it in place. That gradient is
g_j * scale / k (the loss was divided by k and, under fp16 AMP, multiplied by the loss scale),
so ||g_j_T|| = ||incoming|| * k / scale. The hook records one norm per tensor (no host sync); the
step's local sums travel in ONE allreduce of float64 values through the ``reduce_sum`` callable.

The inner products <g_j, u> need a direction u while g_j is still separate. Two ways:

- ``inner_products="copy"`` (exact, u = this step's g-bar): the hook keeps a copy of each
  micro-batch gradient (k extra gradient copies per rank); after synchronisation each copy is
  dotted with g-bar and freed.
- ``inner_products="previous"`` (no copy of g_j, u = the previous test step's g-bar, kept as one
  gradient copy): the hook dots the incoming gradient with u at once. It lags one test step, so
  the first test step has no inner-product statistics (nan: no decision).

With ``inner_products="none"`` only the norm test's values are collected (two numbers reduced).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .statistics import Moments

INNER_PRODUCT_MODES = ("none", "copy", "previous")


def micro_batch_moments(
    n: float,
    b: int,
    sq: Tensor,
    gbar_sq: Tensor,
    ip_sum: Tensor | None = None,
    ip_sq: Tensor | None = None,
    u_sq: Tensor | None = None,
) -> Moments:
    """Moments from the summed per-tensor values (float64 1-D tensors over the T tensors):
    sq = sum_j ||g_j_T||^2, gbar_sq = ||g-bar_T||^2, ip_sum = sum_j <g_j, u>_T,
    ip_sq = sum_j <g_j, u>_T^2, u_sq = ||u_T||^2. nan moments when n < 2."""
    if n < 2:
        return Moments(math.nan, math.nan, math.nan, float(gbar_sq.sum()), math.nan, int(n))
    s, g2 = float(sq.sum()) / n, float(gbar_sq.sum())
    var_norm = b * n * (s - g2) / (n - 1)
    unbiased = (n * g2 - s) / (n - 1)
    var_ip = var_orth = math.nan
    if ip_sum is not None:
        var_ip_t = (ip_sq - ip_sum**2 / n) / (n - 1)
        var_g_t = (sq - n * gbar_sq) / (n - 1)
        safe = torch.where(u_sq > 0, u_sq, torch.ones_like(u_sq))
        orth_t = torch.where(u_sq > 0, var_g_t - var_ip_t / safe, var_g_t)
        var_ip, var_orth = b * float(var_ip_t.sum()), b * float(orth_t.sum())
    return Moments(var_norm, var_ip, var_orth, g2, unbiased, int(n))


def _squared_norms(tensors: list[Tensor]) -> Tensor:
    """||t||^2 of each tensor as float64: norms in the tensors' own precision (one multi-tensor
    kernel; a float64 norm of float32 data takes a much slower path), squared in float64."""
    return torch.stack(torch._foreach_norm(tensors)).to(torch.float64) ** 2


class MicroBatchEstimator:
    """Hooks on the parameters that collect the micro-batch statistics of one step.

    Use (the order of :func:`lars.step.optimizer_step`)::

        est = MicroBatchEstimator(params, inner_products="none").attach()
        est.begin_step(k, loss_scale=scaler._scale if fp16 else None, active=test_now)
        ... k x (forward, (loss / k * scale).backward()) ...
        synchronize; unscale
        moments = est.finish(micro_batch=b, reduce_sum=dist.allreduce_sum)   # before clipping
        ... clip, step ...

    ``finish`` reads p.grad as g-bar (averaged over ranks, unscaled). On steps with
    ``active=False`` the hooks return at once.
    """

    def __init__(self, params: Sequence[Tensor], inner_products: str = "none") -> None:
        if inner_products not in INNER_PRODUCT_MODES:
            raise ValueError(f"inner_products must be one of {INNER_PRODUCT_MODES}")
        self.params = [p for p in params if p.requires_grad]
        self.mode = inner_products
        self.handles: list = []
        self.active = False
        self.k = 1
        self.scale: float | Tensor = 1.0
        self.norms: list[tuple[int, Tensor]] = []
        self.copies: list[tuple[int, Tensor]] = []
        self.dots: list[tuple[int, Tensor]] = []
        self.direction: list[Tensor] | None = None  # "previous": last test step's g-bar
        self.pool: dict[tuple[int, int], Tensor] = {}  # "copy": (tensor, micro-batch) -> buffer
        self.seen: dict[int, int] = {}  # micro-batches seen this step, per tensor

    def attach(self) -> MicroBatchEstimator:
        for index, p in enumerate(self.params):
            self.handles.append(p.register_hook(self._hook(index)))
        return self

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, index: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if not self.active:
                return None
            grad = grad.detach()
            if grad.dtype in (torch.float16, torch.bfloat16):  # float32 norms (dtype= is slower)
                norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
            else:
                norm = torch.linalg.vector_norm(grad)
            self.norms.append((index, norm))
            if self.mode == "copy":
                self.copies.append((index, self._copy(index, grad)))
            elif self.mode == "previous" and self.direction is not None:
                u = self.direction[index]
                self.dots.append((index, torch.dot(grad.flatten().to(u.dtype), u.flatten())))
            return None  # the gradient goes on unchanged

        return hook

    def _copy(self, index: int, grad: Tensor) -> Tensor:
        """A copy of this micro-batch's gradient in a buffer reused from step to step (fresh
        gradient-sized allocations cost page faults every step)."""
        key = (index, self.seen.get(index, 0))
        self.seen[index] = key[1] + 1
        buffer = self.pool.get(key)
        if buffer is None or buffer.shape != grad.shape or buffer.dtype != grad.dtype:
            buffer = self.pool[key] = torch.empty_like(grad)
        return buffer.copy_(grad)

    def begin_step(self, batches_per_allreduce: int, loss_scale=None, active: bool = True) -> None:
        """Before the step's first backward: k and the loss scale of this step (a float or the
        GradScaler's device tensor: no host sync)."""
        self.k, self.active = batches_per_allreduce, active
        self.scale = 1.0 if loss_scale is None else loss_scale
        self.norms, self.copies, self.dots, self.seen = [], [], [], {}

    def _per_tensor(self, pairs: list[tuple[int, Tensor]], square: bool, device) -> Tensor:
        out = torch.zeros(len(self.params), dtype=torch.float64, device=device)
        if pairs:
            index = torch.tensor([i for i, _ in pairs], device=device)
            values = torch.stack([v.to(torch.float64) for _, v in pairs]).to(device)
            out.index_add_(0, index, values**2 if square else values)
        return out

    def _local_sums(self, gbar: list[Tensor], device) -> list[Tensor]:
        factor = self.k / self.scale  # undoes loss / k and the AMP loss scale
        sums = [
            torch.full((1,), float(self.k), dtype=torch.float64, device=device),
            self._per_tensor(self.norms, True, device) * factor**2,
        ]
        if self.mode == "copy":
            dots = [
                (i, torch.dot(c.flatten().to(gbar[i].dtype), gbar[i].flatten()))
                for i, c in self.copies
            ]
        else:
            dots = self.dots
        if self.mode != "none":
            sums.append(self._per_tensor(dots, False, device) * factor)
            sums.append(self._per_tensor(dots, True, device) * factor**2)
        return sums

    @torch.no_grad()
    def finish(self, micro_batch: int, reduce_sum: Callable[[Tensor], Tensor] | None = None):
        """The step's :class:`Moments` (None on an inactive step). One ``reduce_sum`` call (a
        sum over ranks, e.g. ``dist.allreduce_sum``) on 2 (norm) or 1 + 3T float64 values."""
        if not self.active:
            return None
        self.active = False
        device = self.params[0].device
        gbar = [
            (p.grad if p.grad is not None else torch.zeros_like(p))
            .detach()
            .to(torch.promote_types(p.dtype, torch.float32))
            for p in self.params
        ]
        gbar_sq = _squared_norms(gbar)
        sums = self._local_sums(gbar, device)
        sizes = [t.numel() for t in sums]
        flat = torch.cat(sums)
        total = reduce_sum(flat) if reduce_sum is not None else flat
        parts = list(torch.split(total.to(torch.float64).cpu(), sizes))
        n, sq = float(parts[0]), parts[1]
        gbar_sq = gbar_sq.cpu()
        moments = self._moments(n, micro_batch, sq, gbar_sq, parts, gbar)
        self.norms, self.copies, self.dots = [], [], []
        return moments

    def _moments(self, n, b, sq, gbar_sq, parts, gbar) -> Moments:
        if self.mode == "none":
            return micro_batch_moments(n, b, sq, gbar_sq)
        if self.mode == "copy":
            return micro_batch_moments(n, b, sq, gbar_sq, parts[2], parts[3], gbar_sq)
        had_direction = self.direction is not None
        u_sq = _squared_norms(self.direction) if had_direction else None
        if had_direction:  # the next test step's u, in the same buffers
            for u, g in zip(self.direction, gbar):
                u.copy_(g)
        else:
            self.direction = [g.clone() for g in gbar]
        if not had_direction:
            return micro_batch_moments(n, b, sq, gbar_sq)
        return micro_batch_moments(n, b, sq, gbar_sq, parts[2], parts[3], u_sq.cpu())

    def state_dict(self) -> dict:
        """The "previous" direction (so a resumed run decides as the uninterrupted one)."""
        if self.direction is None:
            return {"direction": None}
        return {"direction": [u.detach().cpu() for u in self.direction]}

    def load_state_dict(self, state: dict) -> None:
        direction = state.get("direction")
        if direction is None:
            self.direction = None
            return
        self.direction = [u.to(p.device) for u, p in zip(direction, self.params)]
