"""LARS: layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017, "Large Batch Training of
Convolutional Networks", arXiv:1708.03888, Algorithm 1), and the published variants.

Per parameter tensor w with gradient g, at every step (``variant="you2017"``, the default)::

    d     = g + wd * w
    trust = eta * ||w|| / (||g|| + wd * ||w|| + eps)   if ||w|| > 0 and ||g|| > 0, else 1
    v     = m * v + lr * trust * d                     (v starts at 0)
    w     = w - v                                      (Nesterov: w = w - (m * v + lr * trust * d))

A param group with ``layer_adaptation=False`` (biases, normalisation weights) uses trust = 1, i.e.
plain SGD with momentum. The variants ``nus`` and ``barlowtwins`` (equations in
:mod:`lars.optim._lars_rules`) reproduce the LARS of LARS-ImageNet-PyTorch and of Barlow Twins.

Three layers, as in ``torch.optim.sgd``: the :class:`LARS` class (validation, defaults, state),
the functional core :func:`lars`, and per rule a per-tensor loop (the reference) and a
multi-tensor ``torch._foreach_*`` path (the default). :class:`~lars.optim.TVLARS` is this class
with one seam overridden, :meth:`LARS._trust_scale_fn`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _lars_rules
from ._common import (
    ParamsT,
    TrustRecords,
    TrustScaleFn,
    VariantDefaults,
    as_real,
    check_arg,
    check_lr,
    check_variant,
    new_step_log,
    record_trust_ratios,
    resolve_foreach,
    resolve_variant_args,
    step_on_device,
    use_fused,
)

__all__ = ["LARS", "lars"]


class LARS(Optimizer):
    """LARS (You, Gitman & Ginsburg 2017, Algorithm 1) with momentum and optional Nesterov.

    Update per parameter tensor (settings read from the tensor's param group)::

        d     = g + weight_decay * w
        trust = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps)
                if ||w|| > 0 and ||g|| > 0, else 1        (1 when layer_adaptation=False)
        v     = momentum * v + lr * trust * d             (v starts at 0)
        w     = w - v          (nesterov: w = w - (momentum * v + lr * trust * d))

    Variants (``VARIANTS``, the first is the default; equations in :mod:`lars.optim._lars_rules`):

    - ``you2017``: the paper, as above.
    - ``nus``: LARS-ImageNet-PyTorch (NUS HPC-AI Lab): trust clamped to [0, ``trust_clip``]
      (default 50), d = g + wd w (excluded groups: d = g) clamped element-wise to
      [-``update_clip``, ``update_clip``] (default 10), buf = m buf + d, w -= lr trust buf.
    - ``barlowtwins``: facebookresearch/barlowtwins: trust = eta ||w|| / ||g + wd w||, scaling
      d = g + wd w before the momentum (excluded groups: d = g); mu = m mu + d, w -= lr mu.

    The step count t of each tensor is kept in ``state[p]["step"]`` (a 0-dim tensor on its device).

    Args:
        params: tensors or param groups; a group may set ``layer_adaptation=False``.
        lr: learning rate; may be omitted when every param group carries ``lr``.
        momentum: m in [0, 1).
        weight_decay: L2 coefficient added to the gradient (>= 0).
        trust_coefficient: eta (> 0).
        eps: added to the trust-ratio denominator (>= 0; ``barlowtwins`` has none).
        nesterov: Nesterov momentum (needs momentum > 0; ``you2017`` only).
        variant: one of ``VARIANTS`` (``None``: the first).
        trust_clip, update_clip: ``nus`` only; ``None`` takes the variant's default
            (``VARIANT_DEFAULTS``), ``inf`` switches the clamp off.
        foreach: the multi-tensor path (``None``, the default, or ``True``; see ``fused``) or the
            per-tensor loop (``False``).
        fused: the fused CPU kernel (:mod:`lars.optim._fused`: two passes over each tensor)
            for float32/float64 CPU tensors with one dense layout. ``None`` (default): used when
            ``foreach`` is ``None`` too and the kernel builds; ``True``: used whenever it builds
            (with ``foreach`` not ``False``); ``False``: never. Every other tensor, and every
            tensor where it does not build (one warning says why), takes the ``foreach`` path.
    """

    VARIANTS: ClassVar[tuple[str, ...]] = ("you2017", "nus", "barlowtwins")
    VARIANT_DEFAULTS: ClassVar[VariantDefaults] = {
        "you2017": {},
        "nus": {"trust_clip": 50.0, "update_clip": 10.0},
        "barlowtwins": {},
    }
    # The update rule (of lars.optim._lars_rules) each variant runs.
    _RULES: ClassVar[dict[str, str]] = {v: v for v in VARIANTS}
    # Group options with their defaults, for state dicts saved before an option existed.
    _OPTION_DEFAULTS: ClassVar[dict[str, Any]] = dict(
        momentum=0.9,
        weight_decay=0.0,
        trust_coefficient=0.001,
        eps=0.0,
        nesterov=False,
        layer_adaptation=True,
        foreach=None,
        fused=None,
        variant="you2017",
        trust_clip=None,
        update_clip=None,
    )

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
        variant: str | None = None,
        trust_clip: float | None = None,
        update_clip: float | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = self._base_defaults(
            lr, momentum, weight_decay, trust_coefficient, eps, nesterov, variant, foreach, fused
        )
        defaults.update(trust_clip=trust_clip, update_clip=update_clip)
        self._setup(params, defaults)

    @classmethod
    def _base_defaults(
        cls, lr, momentum, weight_decay, trust_coefficient, eps, nesterov, variant, foreach, fused
    ) -> dict[str, Any]:
        """The options LARS and its subclasses share."""
        return dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            nesterov=nesterov,
            layer_adaptation=True,
            foreach=foreach,
            fused=fused,
            variant=cls.VARIANTS[0] if variant is None else variant,
        )

    def _setup(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        self._check_group(defaults, None)
        self._last = new_step_log()
        Optimizer.__init__(self, params, defaults)

    @classmethod
    def _check_group(cls, group: dict[str, Any], group_index: int | None) -> None:
        check_lr(group["lr"], group_index)
        check_variant(group, cls.VARIANTS, cls.VARIANT_DEFAULTS)
        m = group["momentum"]
        check_arg("momentum", m, 0.0 <= m < 1.0, "0 <= momentum < 1")
        wd = group["weight_decay"]
        check_arg("weight_decay", wd, wd >= 0.0, "weight_decay >= 0")
        eta = group["trust_coefficient"]
        check_arg("trust_coefficient", eta, eta > 0.0, "trust_coefficient > 0")
        check_arg("eps", group["eps"], group["eps"] >= 0.0, "eps >= 0")
        nesterov = group["nesterov"]
        check_arg("nesterov", nesterov, not nesterov or m > 0.0, "nesterov=False when momentum=0")
        if cls._RULES[group["variant"]] == "barlowtwins":
            check_arg("eps", group["eps"], group["eps"] == 0.0, f"eps=0 for {group['variant']!r}")
        first = cls.VARIANTS[0]
        if nesterov and group["variant"] != first:
            raise ValueError(
                f"Invalid nesterov: True; only variant {first!r} has Nesterov momentum"
            )

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
        """(param, 0-dim trust ratio) for every adapted param updated by the last ``step()``.

        The tensors are those computed during the step (no copies); reading their values syncs.
        """
        return record_trust_ratios(self._last["records"], self._last["owners"])

    def _trust_scale_fn(self, group: dict[str, Any]) -> TrustScaleFn | None:
        """The seam subclasses override: a function of the 1-based step count t (a float tensor)
        whose value multiplies the trust ratio of the group's adapted tensors, or ``None``."""
        return None

    def _collect(self, group: dict[str, Any]) -> tuple[list[Tensor], ...]:
        """Params with a gradient, their gradients, momentum buffers and step counts, as real
        views where a parameter is complex (its real and imaginary parts are updated as two real
        numbers, as in torch.optim)."""
        params, grads, bufs, steps = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            view = as_real(p)
            if view is not p:
                self._last["owners"][id(view)] = p
            params.append(view)
            grads.append(as_real(p.grad))
            if group["momentum"] != 0.0:
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(as_real(state["momentum_buffer"]))
            steps.append(step_on_device(state, p))
        return params, grads, bufs, steps

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        records: TrustRecords = []
        self._last["owners"] = {}
        for group in self.param_groups:
            params, grads, bufs, steps = self._collect(group)
            if not params:
                continue
            scale_fn = self._trust_scale_fn(group) if group["layer_adaptation"] else None
            settings = lars_settings(group, self._RULES[group["variant"]])
            group_records, scale = lars(
                params, grads, bufs, state_steps=steps, trust_scale_fn=scale_fn, **settings
            )
            records += group_records
            if scale is not None:
                self._last["scale"] = scale
        self._last["records"] = records
        return loss


def lars_settings(group: dict[str, Any], rule: str = "you2017") -> dict[str, Any]:
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
        fused=group.get("fused"),
        rule=rule,
        trust_clip=group.get("trust_clip"),
        update_clip=group.get("update_clip"),
        norm_clip=group.get("norm_clip"),
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
    fused: bool | None = None,
    rule: str = "you2017",
    trust_clip: float | None = None,
    update_clip: float | None = None,
    norm_clip: float | None = None,
    state_steps: list[Tensor] | None = None,
    trust_scale_fn: TrustScaleFn | None = None,
) -> tuple[TrustRecords, Tensor | None]:
    """Functional LARS (see :class:`LARS` and :mod:`lars.optim._lars_rules` for the equations of
    each ``rule``); updates params and buffers in place.

    ``momentum_buffers`` is empty when ``momentum == 0``. When ``state_steps`` is given, each
    per-param step count is incremented first, and with ``trust_scale_fn`` the trust ratio is
    multiplied by ``trust_scale_fn(t)`` (TVLARS's phi). Returns the trust ratios applied and the
    first trust scale computed (``None`` when there was none). ``foreach`` and ``fused`` select
    the path as in :class:`LARS`. Never reads a tensor on the host.
    """
    if rule not in _lars_rules.RULES:
        raise ValueError(f"Invalid rule: {rule!r}; expected one of {_lars_rules.RULES}")
    hyper = _lars_rules.Hyper(
        rule=rule,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        trust_coefficient=trust_coefficient,
        eps=eps,
        nesterov=nesterov,
        layer_adaptation=layer_adaptation,
        trust_clip=trust_clip,
        update_clip=update_clip,
        norm_clip=norm_clip,
        trust_scale_fn=trust_scale_fn,
        fused=use_fused(foreach, fused),
    )
    impl = _lars_rules.multi_tensor if resolve_foreach(foreach) else _lars_rules.single_tensor
    return impl(params, grads, momentum_buffers, state_steps, hyper)
