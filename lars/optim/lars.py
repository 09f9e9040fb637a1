"""LARS: layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017, "Large Batch Training of
Convolutional Networks", arXiv:1708.03888, Algorithm 1).

Per parameter tensor w with gradient g, at every step::

    d     = g + wd * w
    trust = eta * ||w|| / (||g|| + wd * ||w|| + eps)   if ||w|| > 0 and ||g|| > 0, else 1
    v     = m * v + lr * trust * d                     (v starts at 0)
    w     = w - v                                      (Nesterov: w = w - (m * v + lr * trust * d))

A param group with ``layer_adaptation=False`` (biases, normalisation weights) uses trust = 1, i.e.
plain SGD with momentum. Three layers, as in ``torch.optim.sgd``: the :class:`LARS` class
(validation, defaults, state), the functional core :func:`lars` and its two implementations, a
per-tensor loop (the reference) and a multi-tensor ``torch._foreach_*`` path (the default).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["LARS", "lars"]

ParamsT = Union[Iterable[Tensor], Iterable[dict[str, Any]]]
# The trust ratios applied in one step: chunks of (params, one 0-dim ratio per param). On the
# foreach path the ratios are the 1-D tensor computed during the step (iterating it gives views).
TrustRecords = list[tuple[list[Tensor], Sequence[Tensor]]]
# Maps the 1-based step count t (a float tensor of any shape) to a factor of the trust ratio.
TrustScaleFn = Callable[[Tensor], Tensor]


def check_arg(name: str, value: Any, valid: bool, expected: str) -> None:
    """Raise ``ValueError`` naming the argument when ``valid`` is false."""
    if not valid:
        raise ValueError(f"Invalid {name}: {value!r}; expected {expected}")


def check_lr(lr: Any, group_index: int | None) -> None:
    """``lr`` may be omitted in the constructor only when every param group carries one."""
    if lr is None:
        if group_index is None:
            return
        raise ValueError(
            f"lr: param group {group_index} has no 'lr' and no default lr was given; "
            "pass lr=... to the optimizer or set 'lr' in every param group"
        )
    check_arg("lr", lr, lr >= 0.0, "lr >= 0")


def resolve_foreach(foreach: bool | None) -> bool:
    return True if foreach is None else bool(foreach)


def record_trust_ratios(records: TrustRecords) -> list[tuple[Tensor, Tensor]]:
    return [(p, ratio) for params, ratios in records for p, ratio in zip(params, ratios)]


class LARS(Optimizer):
    """LARS (You, Gitman & Ginsburg 2017, Algorithm 1) with momentum and optional Nesterov.

    Update per parameter tensor (t-th step, settings read from the tensor's param group)::

        d     = g + weight_decay * w
        trust = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps)
                if ||w|| > 0 and ||g|| > 0, else 1        (1 when layer_adaptation=False)
        v     = momentum * v + lr * trust * d             (v starts at 0)
        w     = w - v          (nesterov: w = w - (momentum * v + lr * trust * d))

    Args:
        params: tensors or param groups; a group may set ``layer_adaptation=False``.
        lr: learning rate; may be omitted when every param group carries ``lr``.
        momentum: m in [0, 1).
        weight_decay: L2 coefficient added to the gradient (>= 0).
        trust_coefficient: eta (> 0).
        eps: added to the trust-ratio denominator (>= 0).
        nesterov: Nesterov momentum (needs momentum > 0).
        foreach: use the multi-tensor path (default, ``None``) or the per-tensor loop (``False``).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | None = None,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 0.0,
        nesterov: bool = False,
        *,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            nesterov=nesterov,
            layer_adaptation=True,
            foreach=foreach,
        )
        self._check_group(defaults, None)
        self._trust_records: TrustRecords = []
        super().__init__(params, defaults)

    @classmethod
    def _check_group(cls, group: dict[str, Any], group_index: int | None) -> None:
        check_lr(group["lr"], group_index)
        m = group["momentum"]
        check_arg("momentum", m, 0.0 <= m < 1.0, "0 <= momentum < 1")
        wd = group["weight_decay"]
        check_arg("weight_decay", wd, wd >= 0.0, "weight_decay >= 0")
        eta = group["trust_coefficient"]
        check_arg("trust_coefficient", eta, eta > 0.0, "trust_coefficient > 0")
        check_arg("eps", group["eps"], group["eps"] >= 0.0, "eps >= 0")
        nesterov = group["nesterov"]
        check_arg("nesterov", nesterov, not nesterov or m > 0.0, "nesterov=False when momentum=0")

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
            group.setdefault("momentum", 0.9)
            group.setdefault("weight_decay", 0.0)
            group.setdefault("trust_coefficient", 0.001)
            group.setdefault("eps", 0.0)
            group.setdefault("nesterov", False)
            group.setdefault("layer_adaptation", True)
            group.setdefault("foreach", None)
        self._trust_records = []

    def last_trust_ratios(self) -> list[tuple[Tensor, Tensor]]:
        """(param, 0-dim trust ratio) for every adapted param updated by the last ``step()``.

        The tensors are those computed during the step (no copies); reading their values syncs.
        """
        return record_trust_ratios(self._trust_records)

    def _init_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], bufs: list[Tensor]
    ) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
            if group["momentum"] != 0.0:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        records: TrustRecords = []
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Tensor] = []
            self._init_group(group, params, grads, bufs)
            if params:
                group_records, _ = lars(params, grads, bufs, **lars_settings(group))
                records += group_records
        self._trust_records = records
        return loss


def lars_settings(group: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`lars` read from a param group."""
    return dict(
        lr=group["lr"],
        momentum=group["momentum"],
        weight_decay=group["weight_decay"],
        trust_coefficient=group["trust_coefficient"],
        eps=group["eps"],
        nesterov=group["nesterov"],
        layer_adaptation=group["layer_adaptation"],
        foreach=group["foreach"],
    )


def lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    layer_adaptation: bool = True,
    foreach: bool | None = None,
    state_steps: list[Tensor] | None = None,
    trust_scale_fn: TrustScaleFn | None = None,
) -> tuple[TrustRecords, Tensor | None]:
    """Functional LARS (see :class:`LARS` for the equations); updates params and buffers in place.

    ``momentum_buffers`` is empty when ``momentum == 0``. When ``state_steps`` is given, each
    per-param step count is incremented first, and with ``trust_scale_fn`` the trust ratio is
    multiplied by ``trust_scale_fn(t)`` (TVLARS's phi). Returns the trust ratios applied and the
    first trust scale computed (``None`` when there was none). Never reads a tensor on the host.
    """
    impl = _multi_tensor_lars if resolve_foreach(foreach) else _single_tensor_lars
    return impl(
        params,
        grads,
        momentum_buffers,
        state_steps,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        trust_coefficient=trust_coefficient,
        eps=eps,
        nesterov=nesterov,
        layer_adaptation=layer_adaptation,
        trust_scale_fn=trust_scale_fn,
    )


def _single_tensor_lars(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    steps: list[Tensor] | None,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    layer_adaptation: bool,
    trust_scale_fn: TrustScaleFn | None,
) -> tuple[TrustRecords, Tensor | None]:
    ratios: list[Tensor] = []
    first_scale = None
    for i, (p, g) in enumerate(zip(params, grads)):
        if steps is not None:
            steps[i].add_(1)
        d = g.add(p, alpha=weight_decay) if weight_decay != 0.0 else g
        if layer_adaptation:
            w_norm = torch.linalg.vector_norm(p)
            g_norm = torch.linalg.vector_norm(g)
            ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
            # torch.where instead of a Python `if`: a zero norm must not cost a host sync.
            trust = torch.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)
            if steps is not None and trust_scale_fn is not None:
                scale = trust_scale_fn(steps[i].to(p.dtype))
                first_scale = scale if first_scale is None else first_scale
                trust = trust * scale
            ratios.append(trust)
            update = d * (lr * trust)
        else:
            update = d * lr
        if momentum != 0.0:
            bufs[i].mul_(momentum).add_(update)
            update = update.add(bufs[i], alpha=momentum) if nesterov else bufs[i]
        p.sub_(update)
    records: TrustRecords = [(params, ratios)] if layer_adaptation else []
    return records, first_scale


def _multi_tensor_lars(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    steps: list[Tensor] | None,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    layer_adaptation: bool,
    trust_scale_fn: TrustScaleFn | None,
) -> tuple[TrustRecords, Tensor | None]:
    records: TrustRecords = []
    first_scale = None
    lists: list[list[Tensor]] = [params, grads]
    if momentum != 0.0:
        lists.append(bufs)
    if steps is not None:
        lists.append(steps)
    buckets = Optimizer._group_tensors_by_device_and_dtype(lists)  # type: ignore[arg-type]
    for (_, dtype), (bucket, _) in buckets.items():
        b_params, b_grads = bucket[0], bucket[1]
        b_bufs = bucket[2] if momentum != 0.0 else []
        b_steps = bucket[-1] if steps is not None else None
        if b_steps is not None:
            torch._foreach_add_(b_steps, 1)
        # With momentum, d is pre-divided by (1 - m) so that one lerp gives m * v + lr * trust * d.
        coeff = lr / (1.0 - momentum) if momentum != 0.0 else lr
        scales: Sequence[Tensor] | float = coeff
        if layer_adaptation:
            # Norms of all tensors at once, stacked so the ratio arithmetic is a few vector ops.
            w_norm = torch.stack(torch._foreach_norm(b_params))
            g_norm = torch.stack(torch._foreach_norm(b_grads))
            denom = g_norm.add(w_norm, alpha=weight_decay) if weight_decay != 0.0 else g_norm
            if eps != 0.0:
                denom = denom + eps
            ratio = w_norm.mul(trust_coefficient).div_(denom)
            trust = torch.where(torch.logical_and(w_norm > 0, g_norm > 0), ratio, 1.0)
            if b_steps is not None and trust_scale_fn is not None:
                scale = trust_scale_fn(torch.stack(b_steps).to(dtype))
                first_scale = scale[0] if first_scale is None else first_scale
                trust.mul_(scale)
            records.append((b_params, trust))
            scales = list(torch.mul(trust, coeff).unbind(0))
        # d = g + wd * w in a fresh list: p.grad is never modified.
        d = torch._foreach_add(b_grads, b_params, alpha=weight_decay) if weight_decay else None
        if momentum != 0.0:
            if d is None:
                d = list(torch._foreach_mul(b_grads, scales))
            else:
                torch._foreach_mul_(d, scales)
            torch._foreach_lerp_(b_bufs, d, 1.0 - momentum)  # v = m * v + lr * trust * d
            if nesterov:
                torch._foreach_lerp_(d, b_bufs, momentum)  # m * v + lr * trust * d
                torch._foreach_sub_(b_params, d)
            else:
                torch._foreach_sub_(b_params, b_bufs)
        else:
            src = b_grads if d is None else d
            if not layer_adaptation:
                torch._foreach_add_(b_params, src, alpha=-lr)
            else:
                torch._foreach_addcmul_(b_params, src, scales, value=-1.0)
    return records, first_scale
