"""LAMB: layer-wise adaptive moments (You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel,
Keutzer & Hsieh 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
ICLR 2020, arXiv:1904.00962, Algorithm 2 with bias correction), and the published variants.

Per parameter tensor w with gradient g, at the t-th step (t = 1 on the first step)::

    mo    = b1 * mo + (1 - b1) * g ;   ve = b2 * ve + (1 - b2) * g^2
    r     = (mo / (1 - b1^t)) / (sqrt(ve / (1 - b2^t)) + eps) + wd * w
    trust = ||w|| / ||r||   if ||w|| > 0 and ||r|| > 0, else 1
    w     = w - lr * trust * r

The variants ``nus`` and ``authors`` (equations in :mod:`lars.optim._lamb_rules`) reproduce the
LAMB of LARS-ImageNet-PyTorch and of the TVLARS authors' repository.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _fused, _lamb_rules
from ._common import (
    ParamsT,
    TrustRecords,
    VariantDefaults,
    as_real,
    check_arg,
    check_lr,
    check_variant,
    group_tensors,
    new_step_log,
    record_trust_ratios,
    resolve_foreach,
    resolve_variant_args,
    step_on_device,
    use_fused,
)

__all__ = ["LAMB", "lamb", "global_grad_norm"]


class LAMB(Optimizer):
    """LAMB (You et al. 2020, Algorithm 2) with Adam bias correction and decoupled weight decay.

    Update per parameter tensor, with t its 1-based step count (``state[p]["step"]``)::

        mo    = beta1 * mo + (1 - beta1) * g
        ve    = beta2 * ve + (1 - beta2) * g * g
        r     = (mo / (1 - beta1^t)) / (sqrt(ve / (1 - beta2^t)) + eps) + weight_decay * w
        trust = ||w|| / ||r||  if ||w|| > 0 and ||r|| > 0, else 1   (1 when layer_adaptation=False)
        w     = w - lr * trust * r

    Variants (``VARIANTS``, the first is the default):

    - ``you2020``: the paper, as above.
    - ``nus``: LARS-ImageNet-PyTorch: all the optimizer's gradients scaled by
      min(1, max_grad_norm / (N + 1e-6)), N their global norm (``max_grad_norm`` 1 by default;
      ``p.grad`` is not written), no bias correction, and a trust ratio only when wd != 0.
    - ``authors``: the TVLARS repository: no bias correction, trust = min(||w||, norm_clip) /
      ||r|| (``norm_clip`` 10 by default).

    With ``eps=0`` a tensor whose gradients have all been zero would give 0 / 0; its denominator is
    then clamped to the dtype's smallest normal number so that r = 0. Complex parameters are
    updated as pairs of real numbers (``torch.view_as_real``), as torch.optim's Adam does.

    Args:
        params: tensors or param groups; a group may set ``layer_adaptation=False``.
        lr: learning rate; may be omitted when every param group carries ``lr``.
        betas: (beta1, beta2), each in [0, 1).
        eps: added to the denominator (>= 0).
        weight_decay: coefficient of w in r (>= 0).
        variant: one of ``VARIANTS`` (``None``: the first).
        max_grad_norm: ``nus`` only; norm_clip: ``authors`` only. ``None`` takes the variant's
            default (``VARIANT_DEFAULTS``), ``inf`` switches the clamp off.
        foreach: the multi-tensor path (``None``, the default, or ``True``; see ``fused``) or the
            per-tensor loop (``False``).
        fused: the fused CPU kernel (:mod:`lars.optim._fused`: two passes over each tensor) for
            float32/float64 CPU tensors with one dense layout, as for :class:`~lars.optim.LARS`
            (``None``: when ``foreach`` is ``None`` too and the kernel builds; ``True``: whenever
            it builds; ``False``: never). On the multi-tensor path, ``None`` or ``True`` also
            compute r with Adam's fused kernel where the device has one, eps > 0 and every
            gradient and state tensor has its parameter's strides; ``False``: unfused
            ``torch._foreach_*`` ops.
    """

    VARIANTS: ClassVar[tuple[str, ...]] = ("you2020", "nus", "authors")
    VARIANT_DEFAULTS: ClassVar[VariantDefaults] = {
        "you2020": {},
        "nus": {"max_grad_norm": 1.0},
        "authors": {"norm_clip": 10.0},
    }
    _OPTION_DEFAULTS: ClassVar[dict[str, Any]] = dict(
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=0.0,
        layer_adaptation=True,
        foreach=None,
        fused=None,
        variant="you2020",
        max_grad_norm=None,
        norm_clip=None,
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        variant: str | None = None,
        max_grad_norm: float | None = None,
        norm_clip: float | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            layer_adaptation=True,
            foreach=foreach,
            fused=fused,
            variant=self.VARIANTS[0] if variant is None else variant,
            max_grad_norm=max_grad_norm,
            norm_clip=norm_clip,
        )
        self._check_group(defaults, None)
        self._last = new_step_log()
        super().__init__(params, defaults)

    @classmethod
    def _check_group(cls, group: dict[str, Any], group_index: int | None) -> None:
        check_lr(group["lr"], group_index)
        check_variant(group, cls.VARIANTS, cls.VARIANT_DEFAULTS)
        betas = group["betas"]
        check_arg("betas", betas, len(betas) == 2, "a pair (beta1, beta2)")
        for name, beta in zip(("betas[0]", "betas[1]"), betas):
            check_arg(name, beta, 0.0 <= beta < 1.0, f"0 <= {name} < 1")
        check_arg("eps", group["eps"], group["eps"] >= 0.0, "eps >= 0")
        wd = group["weight_decay"]
        check_arg("weight_decay", wd, wd >= 0.0, "weight_decay >= 0")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            resolve_variant_args(group, self.VARIANT_DEFAULTS)
            self._check_group(group, len(self.param_groups) - 1)
        except ValueError:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self._OPTION_DEFAULTS.items():
                group.setdefault(key, value)
            for p in group["params"]:
                step = self.state.get(p, {}).get("step")
                if step is not None and not torch.is_tensor(step):
                    self.state[p]["step"] = torch.tensor(float(step), dtype=torch.float32)
        self._last = new_step_log()

    def last_trust_ratios(self) -> list[tuple[Tensor, Tensor]]:
        """(param, 0-dim trust ratio) for every adapted param updated by the last ``step()``."""
        return record_trust_ratios(self._last["records"], self._last["owners"])

    def _collect(self, group: dict[str, Any]) -> tuple[list[Tensor], ...]:
        """Params with a gradient, their gradients, moments and step counts (real views of
        complex tensors)."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("LAMB does not support sparse gradients")
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            view = as_real(p)
            if view is not p:
                self._last["owners"][id(view)] = p
            params.append(view)
            grads.append(as_real(p.grad))
            exp_avgs.append(as_real(state["exp_avg"]))
            exp_avg_sqs.append(as_real(state["exp_avg_sq"]))
            steps.append(step_on_device(state, p))
        return params, grads, exp_avgs, exp_avg_sqs, steps

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one step; ``closure`` (optional) re-evaluates the model and returns the loss.

        Under Horovod the trainer calls ``step()`` after ``synchronize()``, so the global norm of
        ``nus`` is that of the averaged gradients."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._last["owners"] = {}
        work = [(group, self._collect(group)) for group in self.param_groups]
        work = [(group, lists) for group, lists in work if lists[0]]
        norm = None
        if any(group["variant"] == "nus" for group, _ in work):
            all_grads = [g for _, lists in work for g in lists[1]]
            first = work[0][0]
            kernel = use_fused(first["foreach"], first["fused"])
            norm = global_grad_norm(
                all_grads, foreach=resolve_foreach(first["foreach"]), fused=kernel
            )
        records: TrustRecords = []
        for group, lists in work:
            scale = None
            if group["variant"] == "nus":  # clip_grad_norm_'s coefficient, without writing p.grad
                scale = (group["max_grad_norm"] / (norm + 1e-6)).clamp_(max=1.0)
            beta1, beta2 = group["betas"]
            records += lamb(
                *lists,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                layer_adaptation=group["layer_adaptation"],
                foreach=group["foreach"],
                fused=group["fused"],
                rule=group["variant"],
                norm_clip=group["norm_clip"],
                grad_scale=scale,
            )
        self._last["records"] = records
        return loss


def global_grad_norm(grads: list[Tensor], *, foreach: bool = True, fused: bool = False) -> Tensor:
    """sqrt(sum of ||g||^2) over all ``grads`` as a 0-dim float32 (or float64) tensor on the first
    gradient's device, computed per (device, dtype) bucket as ``clip_grad_norm_`` does; no sync.
    With ``fused``, a bucket the fused CPU kernels take is summed by them in one pass."""
    first = grads[0].device
    parts = []
    kernel = _fused.fusable([grads], None) if fused and foreach else [False] * len(grads)
    for (_, dtype, in_kernel), (bucket,) in group_tensors([grads], key=kernel.__getitem__).items():
        acc = torch.promote_types(dtype, torch.float32)
        if in_kernel:
            parts.append(_fused.load().sum_squares(bucket).sqrt_().to(acc).to(first))
            continue
        norms = (
            torch._foreach_norm(bucket)
            if foreach
            else [torch.linalg.vector_norm(g) for g in bucket]
        )
        parts.append(torch.linalg.vector_norm(torch.stack(norms).to(acc)).to(first))
    return torch.linalg.vector_norm(torch.stack([p.to(parts[0].dtype) for p in parts]))


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
    fused: bool | None = None,
    rule: str = "you2020",
    norm_clip: float | None = None,
    grad_scale: Tensor | None = None,
) -> TrustRecords:
    """Functional LAMB (see :class:`LAMB` and :mod:`lars.optim._lamb_rules` for the equations of
    each ``rule``); updates params and state in place and returns the trust ratios applied.
    ``grad_scale`` (0-dim) multiplies every gradient first (``nus``'s global-norm clip). Never
    reads a tensor on the host."""
    if rule not in _lamb_rules.RULES:
        raise ValueError(f"Invalid rule: {rule!r}; expected one of {_lamb_rules.RULES}")
    hyper = _lamb_rules.Hyper(
        rule=rule,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        layer_adaptation=layer_adaptation,
        norm_clip=norm_clip,
        grad_scale=grad_scale,
        fused=fused is not False,
        cpu_kernel=use_fused(foreach, fused),
    )
    impl = _lamb_rules.multi_tensor if resolve_foreach(foreach) else _lamb_rules.single_tensor
    return impl(params, grads, exp_avgs, exp_avg_sqs, state_steps, hyper)
