"""LAMB: layer-wise adaptive moments (You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel,
Keutzer & Hsieh 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
ICLR 2020, arXiv:1904.00962, Algorithm 2 with bias correction).

Per parameter tensor w with gradient g, at the t-th step (t = 1 on the first step)::

    mo    = b1 * mo + (1 - b1) * g ;   ve = b2 * ve + (1 - b2) * g^2
    r     = (mo / (1 - b1^t)) / (sqrt(ve / (1 - b2^t)) + eps) + wd * w
    trust = ||w|| / ||r||   if ||w|| > 0 and ||r|| > 0, else 1
    w     = w - lr * trust * r
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .lars import (
    ParamsT,
    TrustRecords,
    check_arg,
    check_lr,
    increment_steps,
    record_trust_ratios,
    resolve_foreach,
    step_dtype,
)

__all__ = ["LAMB", "lamb"]

try:  # device types with fused Adam kernels (CPU among them since torch 2.4)
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    _FUSED_DEVICES: list[str] | None = _get_fused_kernels_supported_devices()
except ImportError:  # older torch: the unfused multi-tensor path only
    _FUSED_DEVICES = None


class LAMB(Optimizer):
    """LAMB (You et al. 2020, Algorithm 2) with Adam bias correction and decoupled weight decay.

    Update per parameter tensor, with t its 1-based step count (``state[p]["step"]``)::

        mo    = beta1 * mo + (1 - beta1) * g
        ve    = beta2 * ve + (1 - beta2) * g * g
        r     = (mo / (1 - beta1^t)) / (sqrt(ve / (1 - beta2^t)) + eps) + weight_decay * w
        trust = ||w|| / ||r||  if ||w|| > 0 and ||r|| > 0, else 1   (1 when layer_adaptation=False)
        w     = w - lr * trust * r

    With ``eps=0`` a tensor whose gradients have all been zero would give 0 / 0; its denominator is
    then clamped to the dtype's smallest normal number so that r = 0 (one extra pass, only when
    eps == 0).

    The multi-tensor path computes r with Adam's fused kernel where the device has one (and
    eps > 0), else with unfused ``torch._foreach_*`` ops; both are tested against the loop.

    Args:
        params: tensors or param groups; a group may set ``layer_adaptation=False``.
        lr: learning rate; may be omitted when every param group carries ``lr``.
        betas: (beta1, beta2), each in [0, 1).
        eps: added to the denominator (>= 0).
        weight_decay: coefficient of w in r (>= 0).
        foreach: use the multi-tensor path (default, ``None``) or the per-tensor loop (``False``).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            layer_adaptation=True,
            foreach=foreach,
        )
        self._check_group(defaults, None)
        self._trust_records: TrustRecords = []
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group: dict[str, Any], group_index: int | None) -> None:
        check_lr(group["lr"], group_index)
        betas = group["betas"]
        check_arg("betas", betas, len(betas) == 2, "a pair (beta1, beta2)")
        for name, beta in zip(("betas[0]", "betas[1]"), betas):
            check_arg(name, beta, 0.0 <= beta < 1.0, f"0 <= {name} < 1")
        check_arg("eps", group["eps"], group["eps"] >= 0.0, "eps >= 0")
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
            group.setdefault("betas", (0.9, 0.999))
            group.setdefault("eps", 1e-6)
            group.setdefault("weight_decay", 0.0)
            group.setdefault("layer_adaptation", True)
            group.setdefault("foreach", None)
            for p in group["params"]:
                step = self.state.get(p, {}).get("step")
                if step is not None and not torch.is_tensor(step):
                    self.state[p]["step"] = torch.tensor(float(step), dtype=torch.float32)
        self._trust_records = []

    def last_trust_ratios(self) -> list[tuple[Tensor, Tensor]]:
        """(param, 0-dim trust ratio) for every adapted param updated by the last ``step()``."""
        return record_trust_ratios(self._trust_records)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        steps: list[Tensor],
    ) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("LAMB does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif state["step"].device != p.device:  # e.g. loaded with map_location="cpu"
                state["step"] = state["step"].to(p.device)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])

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
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            steps: list[Tensor] = []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, steps)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            records += lamb(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                steps,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                layer_adaptation=group["layer_adaptation"],
                foreach=group["foreach"],
            )
        self._trust_records = records
        return loss


def lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    layer_adaptation: bool = True,
    foreach: bool | None = None,
) -> TrustRecords:
    """Functional LAMB (see :class:`LAMB` for the equations); updates params and state in place
    and returns the trust ratios applied. Never reads a tensor on the host."""
    impl = _multi_tensor_lamb if resolve_foreach(foreach) else _single_tensor_lamb
    return impl(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        layer_adaptation=layer_adaptation,
    )


def _single_tensor_lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    layer_adaptation: bool,
) -> TrustRecords:
    ratios: list[Tensor] = []
    for p, g, mo, ve, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step.add_(1)
        mo.mul_(beta1).add_(g, alpha=1.0 - beta1)
        ve.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        t = step.to(step_dtype(p.dtype))
        # Bias corrections as tensors: t is on the device, reading it would sync.
        bias_correction1 = 1.0 - torch.pow(beta1, t)
        bias_correction2 = 1.0 - torch.pow(beta2, t)
        denom = (ve / bias_correction2).sqrt_().add_(eps)
        if eps == 0.0:
            denom.clamp_min_(torch.finfo(denom.dtype).tiny)
        r = (mo / bias_correction1).div_(denom)
        if weight_decay != 0.0:
            r.add_(p, alpha=weight_decay)
        if layer_adaptation:
            w_norm = torch.linalg.vector_norm(p)
            r_norm = torch.linalg.vector_norm(r)
            trust = torch.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm, 1.0)
            ratios.append(trust)
            r.mul_(trust)
        p.add_(r, alpha=-lr)
    return [(params, ratios)] if layer_adaptation else []


def _multi_tensor_lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    layer_adaptation: bool,
) -> TrustRecords:
    records: TrustRecords = []
    lists = [params, grads, exp_avgs, exp_avg_sqs, steps]
    buckets = Optimizer._group_tensors_by_device_and_dtype(lists)  # type: ignore[arg-type]
    for (device, dtype), (bucket, _) in buckets.items():
        b_params, b_grads, b_exp_avgs, b_exp_avg_sqs, b_steps = bucket
        increment_steps(b_steps)
        moments = (b_params, b_grads, b_exp_avgs, b_exp_avg_sqs, b_steps)
        if _fused_adam_supported(device, b_steps, eps):
            r = _fused_direction(
                *moments, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay
            )
        else:
            r = _foreach_direction(
                *moments, dtype=dtype, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay
            )
        if layer_adaptation:
            w_norm = torch.stack(torch._foreach_norm(b_params))
            r_norm = torch.stack(torch._foreach_norm(r))
            trust = torch.where(torch.logical_and(w_norm > 0, r_norm > 0), w_norm / r_norm, 1.0)
            records.append((b_params, trust))
            # The 0-dim factors go in as addcmul's tensor1, which CUDA's fast path accepts.
            torch._foreach_addcmul_(b_params, list(trust.unbind(0)), r, value=-lr)
        else:
            torch._foreach_add_(b_params, r, alpha=-lr)
    return records


def _fused_adam_supported(device: torch.device | None, steps: list[Tensor], eps: float) -> bool:
    return (
        _FUSED_DEVICES is not None
        and device is not None
        and device.type in _FUSED_DEVICES
        and steps[0].dtype == torch.float32
        and eps > 0.0  # with eps = 0 the unfused path guards 0 / 0
    )


def _fused_direction(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> list[Tensor]:
    """r = (mo / bc1) / (sqrt(ve / bc2) + eps) + wd * w in one pass, updating mo and ve.

    Adam's fused kernel does x -= lr * (mo / bc1) / (sqrt(ve / bc2) + eps), with the moments
    updated as in LAMB; run with lr = -1 on a fresh x = wd * w, it leaves r in x.
    """
    r = list(torch._foreach_mul(params, weight_decay)) if weight_decay != 0.0 else None
    if r is None:
        r = [torch.zeros_like(p) for p in params]
    torch._fused_adam_(
        r,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        lr=-1.0,
        beta1=beta1,
        beta2=beta2,
        weight_decay=0.0,
        eps=eps,
        amsgrad=False,
        maximize=False,
    )
    return r


def _foreach_direction(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    dtype: torch.dtype,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> list[Tensor]:
    """The same r with unfused multi-tensor ops (any device, any eps)."""
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    # With c2 = sqrt(bc2): (mo / bc1) / (sqrt(ve) / c2 + eps) == (c2 / bc1) * mo / (sqrt(ve) +
    # eps * c2), so the per-tensor bias corrections are one vector computed for all tensors.
    t = torch.stack(steps).to(step_dtype(dtype))
    bc2_sqrt = torch.pow(beta2, t).neg_().add_(1.0).sqrt_()
    step_scale = torch.pow(beta1, t).neg_().add_(1.0).reciprocal_().mul_(bc2_sqrt)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if eps != 0.0:
        torch._foreach_add_(denom, list(bc2_sqrt.mul_(eps).unbind(0)))
    else:
        torch._foreach_clamp_min_(denom, torch.finfo(dtype).tiny)
    r = list(torch._foreach_div(exp_avgs, denom))
    del denom
    torch._foreach_mul_(r, list(step_scale.unbind(0)))
    if weight_decay != 0.0:
        torch._foreach_add_(r, params, alpha=weight_decay)
    return r
