"""TVLARS: time-varying LARS (Do, Nguyen, Nguyen, Tran-Thanh, Tran & Pham 2023, "Revisiting LARS
for Large Batch Training Generalization of Neural Networks", arXiv:2309.14053, eq. 4-5).

LARS whose trust ratio is multiplied, at the t-th step (t = 1 on the first step), by::

    phi(t) = 1 / (alpha + exp(lmbda * (t - delay_steps))) + min_scale

phi replaces the learning-rate warm-up and the decay schedule: with alpha = 1 the first
``delay_steps`` steps run near plain LARS at the full learning rate, then phi falls smoothly
towards ``min_scale``. :class:`TVLARS` is :class:`~lars.optim.LARS` with one seam overridden
(:meth:`~lars.optim.LARS._trust_scale_fn` returns phi); the step itself is LARS's.
"""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._common import ParamsT, TrustRecords, TrustScaleFn, VariantDefaults, check_arg
from .lars import LARS, lars

__all__ = ["TVLARS", "tvlars", "tvlars_phi"]


def tvlars_phi(
    t: Tensor, *, lmbda: float, alpha: float, delay_steps: float, min_scale: float
) -> Tensor:
    """phi(t) = 1 / (alpha + exp(lmbda * (t - delay_steps))) + min_scale, on t's device.

    Late in long runs exp() overflows (float32 past lmbda * (t - delay_steps) > 88): IEEE gives
    exp = inf, 1 / (alpha + inf) = 0 and phi = min_scale exactly, which is also the limit of the
    formula, so phi stays finite and tends to min_scale smoothly (alpha > 0 keeps the other end,
    exp -> 0 for t << delay_steps, at 1 / alpha + min_scale).
    """
    return torch.exp((t - delay_steps) * lmbda).add_(alpha).reciprocal_().add_(min_scale)


class TVLARS(LARS):
    """TVLARS (Do et al. 2023, eq. 4-5): LARS with its trust ratio multiplied by phi(t).

    Update per parameter tensor, with t the tensor's 1-based step count (``variant="paper"``)::

        phi   = 1 / (alpha + exp(lmbda * (t - delay_steps))) + min_scale
        d     = g + weight_decay * w
        trust = phi * trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps)
                if ||w|| > 0 and ||g|| > 0, else phi        (1 when layer_adaptation=False)
        v     = momentum * v + lr * trust * d
        w     = w - v          (nesterov: w = w - (momentum * v + lr * trust * d))

    ``variant="authors"`` is the authors' released ``opt/tvlars.py`` (github.com/KhoiDOO/tvlars,
    the revision with ``0.1 + exp``): the Barlow Twins form of LARS with both norms clamped::

        d     = g + weight_decay * w
        trust = phi * trust_coefficient * min(||w||, norm_clip) / min(||d||, norm_clip)
                if ||w|| > 0 and ||d|| > 0, else 1          (excluded groups: d = g, no phi)
        mu    = momentum * mu + trust * d ;   w = w - lr * mu

    with ``norm_clip=10`` and ``alpha=0.1`` by default for that variant (``delay_steps=0`` and
    ``min_scale=0`` as for the paper), so phi = 1 / (0.1 + exp(lmbda * t)). That code counts
    completed ``step()`` calls from 0 and uses ``step_cnt + 1``: the same 1-based t as here. Its
    counter lives outside the state dict (lost on resume); here t is ``state[p]["step"]``. Its
    other revision (no phi for a number of epochs, then phi of the undelayed t) is not reproduced.

    Args:
        params, lr, momentum, weight_decay, trust_coefficient, eps, nesterov, foreach, fused: as
            :class:`~lars.optim.LARS` (``eps`` and ``nesterov``: ``paper`` only).
        lmbda: decay coefficient lambda (>= 0), per optimizer step.
        alpha: alpha (> 0); ``None`` takes the variant's default (paper 1.0, authors 0.1).
            phi -> 1 / alpha + min_scale for t << delay_steps, phi(delay_steps) = 1 / (alpha + 1)
            + min_scale.
        delay_steps: d_e (>= 0), in optimizer steps.
        min_scale: gamma_min (>= 0), the value phi tends to for t >> delay_steps.
        variant: ``"paper"`` (default) or ``"authors"``.
        norm_clip: ``authors`` only; ``None`` takes its default 10.

    phi is computed on the device in the parameters' dtype (at least float32), with no host sync;
    it never becomes inf or NaN (see :func:`tvlars_phi`). :attr:`last_phi` holds the value of the
    last step; :meth:`last_trust_ratios` returns the ratio actually applied (phi included).
    """

    VARIANTS: ClassVar[tuple[str, ...]] = ("paper", "authors")
    VARIANT_DEFAULTS: ClassVar[VariantDefaults] = {
        "paper": {"alpha": 1.0},
        "authors": {"alpha": 0.1, "norm_clip": 10.0},
    }
    _RULES: ClassVar[dict[str, str]] = {"paper": "you2017", "authors": "barlowtwins"}
    _OPTION_DEFAULTS: ClassVar[dict[str, Any]] = {
        **{k: v for k, v in LARS._OPTION_DEFAULTS.items() if not k.endswith("_clip")},
        **dict(variant="paper", lmbda=0.001, alpha=1.0, delay_steps=0, min_scale=0.0),
        "norm_clip": None,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | None = None,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 0.0,
        nesterov: bool = False,
        lmbda: float = 0.001,
        alpha: float | None = None,
        delay_steps: float = 0,
        min_scale: float = 0.0,
        *,
        variant: str | None = None,
        norm_clip: float | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = self._base_defaults(
            lr, momentum, weight_decay, trust_coefficient, eps, nesterov, variant, foreach, fused
        )
        defaults.update(
            lmbda=lmbda,
            alpha=alpha,
            delay_steps=delay_steps,
            min_scale=min_scale,
            norm_clip=norm_clip,
        )
        self._setup(params, defaults)

    @classmethod
    def _check_group(cls, group: dict[str, Any], group_index: int | None) -> None:
        super()._check_group(group, group_index)
        lmbda = group["lmbda"]
        check_arg("lmbda", lmbda, lmbda >= 0.0, "lmbda >= 0")
        delay = group["delay_steps"]
        check_arg("delay_steps", delay, delay >= 0, "delay_steps >= 0")
        min_scale = group["min_scale"]
        check_arg("min_scale", min_scale, min_scale >= 0.0, "min_scale >= 0")

    @property
    def last_phi(self) -> Tensor | None:
        """phi of the last step as a 0-dim tensor (``None`` before the first adapted step).

        Every param that received a gradient at every step shares one t; this is phi for the first
        adapted param of the last step. Reading its value syncs with the device.
        """
        return self._last["scale"]

    def _trust_scale_fn(self, group: dict[str, Any]) -> TrustScaleFn:
        """phi(t) with the group's lmbda, alpha, delay_steps and min_scale."""
        return partial(
            tvlars_phi,
            lmbda=group["lmbda"],
            alpha=group["alpha"],
            delay_steps=group["delay_steps"],
            min_scale=group["min_scale"],
        )


def tvlars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: list[Tensor],
    *,
    lmbda: float,
    alpha: float,
    delay_steps: float,
    min_scale: float,
    variant: str = "paper",
    norm_clip: float | None = None,
    **lars_kwargs: Any,
) -> tuple[TrustRecords, Tensor | None]:
    """Functional TVLARS (see :class:`TVLARS`): increments ``state_steps``, then a LARS step (the
    rule of ``variant``) whose trust ratio is multiplied by phi(t). ``lars_kwargs`` are those of
    :func:`~lars.optim.lars.lars` (``lr``, ``momentum``, ...). Returns the trust ratios applied
    and phi (0-dim) of the first adapted param, or ``None`` when ``layer_adaptation`` is false
    (phi is then not applied).
    """
    phi = partial(
        tvlars_phi, lmbda=lmbda, alpha=alpha, delay_steps=delay_steps, min_scale=min_scale
    )
    return lars(
        params,
        grads,
        momentum_buffers,
        rule=TVLARS._RULES[variant],
        norm_clip=norm_clip,
        state_steps=state_steps,
        trust_scale_fn=phi,
        **lars_kwargs,
    )
