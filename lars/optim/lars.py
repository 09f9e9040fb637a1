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


def increment_steps(steps: list[Tensor]) -> None:
    """steps[i] += 1 for the 0-dim step tensors, on their device."""
    if steps[0].is_cpu:
        # On CPU foreach loops over the tensors; a ready-made scalar tensor spares re-wrapping 1
        # into a tensor for each of them.
        torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)
    else:
        torch._foreach_add_(steps, 1.0)


def step_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """dtype for arithmetic on the step count t: the parameters' dtype, but at least float32
    (bfloat16 cannot even count past 256)."""
    return torch.promote_types(param_dtype, torch.float32)


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
                scale = trust_scale_fn(steps[i].to(step_dtype(p.dtype)))
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
            increment_steps(b_steps)
        lr_trust = None  # lr * trust, one entry per tensor, when the group is adapted
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
                scale = trust_scale_fn(torch.stack(b_steps).to(step_dtype(dtype)))
                first_scale = scale[0] if first_scale is None else first_scale
                trust.mul_(scale)
            records.append((b_params, trust))
            lr_trust = list(torch.mul(trust, lr).unbind(0))
        _foreach_update(b_params, b_grads, b_bufs, lr_trust, lr, momentum, weight_decay, nesterov)
    return records, first_scale


def _foreach_add_scaled(
    dst: list[Tensor], per_tensor: list[Tensor] | None, factor: float, src: list[Tensor]
) -> None:
    """dst[i] += factor * per_tensor[i] * src[i], or dst[i] += factor * src[i] when per_tensor is
    None. The per-tensor factors stay on the device as 0-dim tensors, passed as addcmul's tensor1,
    the operand for which CUDA's multi-tensor fast path accepts 0-dim tensors."""
    if per_tensor is None:
        torch._foreach_add_(dst, src, alpha=factor)
    else:
        torch._foreach_addcmul_(dst, per_tensor, src, value=factor)


def _foreach_update(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    lr_trust: list[Tensor] | None,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
) -> None:
    """v = m * v + s * (g + wd * w); w = w - v (Nesterov: w = w - (m * v + s * (g + wd * w))),
    with s = lr_trust[i] (0-dim), or lr when lr_trust is None. In-place passes only: no
    temporary the size of the model, and p.grad is only read."""
    base = 1.0 if lr_trust is not None else lr
    if momentum != 0.0:
        torch._foreach_mul_(bufs, momentum)
        _foreach_add_scaled(bufs, lr_trust, base, grads)
        if weight_decay != 0.0:
            _foreach_add_scaled(bufs, lr_trust, base * weight_decay, params)
        if not nesterov:
            torch._foreach_sub_(params, bufs)
            return
    # w -= [m * v +] s * (g + wd * w): the decay term first, while w still holds the old weights.
    if weight_decay != 0.0:
        _foreach_add_scaled(params, lr_trust, -base * weight_decay, params)
    if momentum != 0.0:
        torch._foreach_add_(params, bufs, alpha=-momentum)
    _foreach_add_scaled(params, lr_trust, -base, grads)
