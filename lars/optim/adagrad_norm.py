"""AdaGrad-Norm (Ward, Wu & Bottou 2019, "AdaGrad stepsizes: sharp convergence over nonconvex
landscapes", arXiv:1806.01811): one scalar step size for the whole model.

With d_t = g_t + wd * w_t (wd = 0: the paper) and the sum over every parameter of every group::

    b_t^2 = b0^2 + sum_{s <= t} ||d_s||^2
    w_{t+1} = w_t - lr / b_t * d_t

(the rate lr / sqrt(b0^2 + sum_t ||g_t||^2) of the issue; b_t includes the current step's norm,
as in the paper's Algorithm "AdaGrad-Norm"). The running sum is kept per parameter,
``state[p]["sum_sq"]`` = sum_s ||d_s(p)||^2, so a state dict round-trips without a key that is
not a parameter; the global b_t^2 is b0^2 plus their sum, recomputed on the device every step.
A group's ``b0`` and ``lr`` are its own; the norm sum is shared by all groups (one scalar for
the model, as the paper's method is stated for the whole parameter vector).

As LARS: a multi-tensor (``torch._foreach_*``) path, used by default, and a per-tensor loop
(``foreach=False``), the reference; no host synchronisation in ``step()``; ``Cls(param_groups)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._common import (
    ParamsT,
    as_real,
    check_arg,
    check_lr,
    foreach_add_scaled,
    increment_steps,
    resolve_foreach,
    step_dtype,
    step_on_device,
)

__all__ = ["AdaGradNorm"]


class AdaGradNorm(Optimizer):
    """AdaGrad-Norm: w -= lr / sqrt(b0^2 + sum_t ||g_t + wd w_t||^2) * (g + wd w).

    Args:
        params: tensors or param groups.
        lr: eta of the paper (may be omitted when every group carries ``lr``).
        b0: initial accumulator, > 0 (b_0 of the paper).
        weight_decay: L2 coefficient added to the gradient (>= 0).
        foreach: multi-tensor path (default, ``None``) or the per-tensor loop (``False``).
    """

    _OPTION_DEFAULTS = dict(b0=0.1, weight_decay=0.0, foreach=None)

    def __init__(
        self,
        params: ParamsT,
        lr: float | None = None,
        b0: float = 0.1,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(lr=lr, b0=b0, weight_decay=weight_decay, foreach=foreach)
        self._check_group(defaults, None)
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group: dict[str, Any], group_index: int | None) -> None:
        check_lr(group["lr"], group_index)
        check_arg("b0", group["b0"], group["b0"] > 0.0, "b0 > 0")
        wd = group["weight_decay"]
        check_arg("weight_decay", wd, wd >= 0.0, "weight_decay >= 0")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1], len(self.param_groups) - 1)
        except ValueError:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self._OPTION_DEFAULTS.items():
                group.setdefault(key, value)

    def _collect(self, group: dict[str, Any]):
        params, grads, sums, steps = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdaGradNorm does not support sparse gradients")
            state = self.state[p]
            if "sum_sq" not in state:
                state["sum_sq"] = torch.zeros((), dtype=step_dtype(p.dtype), device=p.device)
            elif state["sum_sq"].device != p.device:
                state["sum_sq"] = state["sum_sq"].to(p.device)
            params.append(as_real(p))
            grads.append(as_real(p.grad))
            sums.append(state["sum_sq"])
            steps.append(step_on_device(state, p))
        return params, grads, sums, steps

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            params, grads, sums, steps = self._collect(group)
            if params:
                update = _accumulate(params, grads, sums, steps, group)
                work.append((group, params, update))
        if not work:
            return loss
        total = self._norm_sum()
        for group, params, update in work:
            _apply(params, update, total, group)
        return loss

    def _norm_sum(self) -> Tensor:
        """sum over every parameter with state of sum_sq, on the first parameter's device."""
        sums = [s["sum_sq"] for s in self.state.values() if "sum_sq" in s]
        device = sums[0].device
        return torch.stack([s.to(device) for s in sums]).sum()


def _accumulate(params, grads, sums, steps, group) -> list[Tensor]:
    """d = g + wd w; sum_sq += ||d||^2; steps += 1. Returns the d's (the grads when wd = 0)."""
    wd = group["weight_decay"]
    if resolve_foreach(group["foreach"]):
        update = torch._foreach_add(grads, params, alpha=wd) if wd else list(grads)
        norms = torch._foreach_norm(update)
        torch._foreach_add_(sums, torch._foreach_mul(norms, norms))
        increment_steps(steps)
        return update
    update = []
    for p, g, s, t in zip(params, grads, sums, steps):
        d = g.add(p, alpha=wd) if wd else g
        s.add_(torch.linalg.vector_norm(d).to(s.dtype) ** 2)
        t.add_(1.0)
        update.append(d)
    return update


def _apply(params, update, total: Tensor, group) -> None:
    """w -= lr / sqrt(b0^2 + total) * d (the factor stays a 0-dim tensor: no host sync)."""
    inv = torch.rsqrt(total + group["b0"] ** 2)
    lr = group["lr"]
    if resolve_foreach(group["foreach"]):
        factors = [inv.to(dtype=p.dtype, device=p.device) for p in params]
        foreach_add_scaled(params, factors, -lr, update)
        return
    for p, d in zip(params, update):
        p.add_(d * inv.to(dtype=p.dtype, device=p.device), alpha=-lr)
