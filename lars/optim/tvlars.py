"""TVLARS: time-varying LARS (Do, Nguyen, Nguyen, Tran-Thanh, Tran & Pham 2023, "Revisiting LARS
for Large Batch Training Generalization of Neural Networks", arXiv:2309.14053, eq. 4-5).

LARS whose trust ratio is multiplied, at the t-th step (t = 1 on the first step), by::

    phi(t) = 1 / (alpha + exp(lmbda * (t - delay_steps))) + min_scale

phi replaces the learning-rate warm-up and the decay schedule: with alpha = 1 the first
``delay_steps`` steps run near plain LARS at the full learning rate, then phi falls smoothly
towards ``min_scale``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .lars import LARS, ParamsT, TrustRecords, check_arg, lars, lars_settings

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

    Update per parameter tensor, with t the tensor's 1-based step count::

        phi   = 1 / (alpha + exp(lmbda * (t - delay_steps))) + min_scale
        d     = g + weight_decay * w
        trust = phi * trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps)
                if ||w|| > 0 and ||g|| > 0, else phi        (1 when layer_adaptation=False)
        v     = momentum * v + lr * trust * d
        w     = w - v          (nesterov: w = w - (momentum * v + lr * trust * d))

    The step count lives in the optimizer state (``state[p]["step"]``, a 0-dim tensor on the
    parameter's device, as in ``torch.optim.Adam``), so a resumed run continues phi where it was.
    Run TVLARS with a constant learning rate: phi is the schedule.

    The authors' released code (github.com/KhoiDOO/tvlars, ``opt/tvlars.py``, the revision with
    ``0.1 + exp``) computes phi = 1 / (0.1 + exp(lmbda * (step_cnt + 1))), where ``step_cnt``
    counts completed ``step()`` calls from 0: the same 1-based t as here, so ``alpha=0.1,
    delay_steps=0, min_scale=0`` reproduces its phi. That code also clamps both norms at 10 and
    keeps its counter outside the state dict (lost on resume); neither is reproduced. Another
    revision there applies no phi for a number of epochs and then phi of the undelayed t; that is
    not reproduced either. The default ``lmbda=0.001`` is that code's default.

    Args:
        params, lr, momentum, weight_decay, trust_coefficient, eps, nesterov, foreach: as
            :class:`~lars.optim.LARS`.
        lmbda: decay coefficient lambda (>= 0), per optimizer step.
        alpha: alpha (> 0): phi -> 1 / alpha + min_scale for t << delay_steps and
            phi(delay_steps) = 1 / (alpha + 1) + min_scale.
        delay_steps: d_e (>= 0), in optimizer steps.
        min_scale: gamma_min (>= 0), the value phi tends to for t >> delay_steps.

    phi is computed on the device in the parameters' dtype, with no host sync; it never becomes
    inf or NaN (see :func:`tvlars_phi`). :attr:`last_phi` holds the value of the last step.

    :meth:`last_trust_ratios` returns the ratio actually applied, i.e. the LARS ratio times phi.
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
        lmbda: float = 0.001,
        alpha: float = 1.0,
        delay_steps: float = 0,
        min_scale: float = 0.0,
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
            lmbda=lmbda,
            alpha=alpha,
            delay_steps=delay_steps,
            min_scale=min_scale,
            layer_adaptation=True,
            foreach=foreach,
        )
        self._check_group(defaults, None)
        self._trust_records: TrustRecords = []
        self._last_phi: Tensor | None = None
        Optimizer.__init__(self, params, defaults)

    @classmethod
    def _check_group(cls, group: dict[str, Any], group_index: int | None) -> None:
        super()._check_group(group, group_index)
        lmbda, alpha = group["lmbda"], group["alpha"]
        check_arg("lmbda", lmbda, lmbda >= 0.0, "lmbda >= 0")
        check_arg("alpha", alpha, alpha > 0.0, "alpha > 0")
        delay = group["delay_steps"]
        check_arg("delay_steps", delay, delay >= 0, "delay_steps >= 0")
        min_scale = group["min_scale"]
        check_arg("min_scale", min_scale, min_scale >= 0.0, "min_scale >= 0")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("lmbda", 0.001)
            group.setdefault("alpha", 1.0)
            group.setdefault("delay_steps", 0)
            group.setdefault("min_scale", 0.0)
            for p in group["params"]:
                step = self.state.get(p, {}).get("step")
                if step is not None and not torch.is_tensor(step):
                    self.state[p]["step"] = torch.tensor(float(step), dtype=torch.float32)
        self._last_phi = None

    @property
    def last_phi(self) -> Tensor | None:
        """phi of the last step as a 0-dim tensor (``None`` before the first adapted step).

        Every param that received a gradient at every step shares one t; this is phi for the first
        adapted param of the last step. Reading its value syncs with the device.
        """
        return self._last_phi

    def _init_tv_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        bufs: list[Tensor],
        steps: list[Tensor],
    ) -> None:
        self._init_group(group, params, grads, bufs)
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            elif state["step"].device != p.device:  # e.g. loaded with map_location="cpu"
                state["step"] = state["step"].to(p.device)
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
            bufs: list[Tensor] = []
            steps: list[Tensor] = []
            self._init_tv_group(group, params, grads, bufs, steps)
            if not params:
                continue
            group_records, phi = tvlars(
                params,
                grads,
                bufs,
                steps,
                lmbda=group["lmbda"],
                alpha=group["alpha"],
                delay_steps=group["delay_steps"],
                min_scale=group["min_scale"],
                **lars_settings(group),
            )
            records += group_records
            if phi is not None:
                self._last_phi = phi
        self._trust_records = records
        return loss


def tvlars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    lmbda: float,
    alpha: float,
    delay_steps: float,
    min_scale: float,
    layer_adaptation: bool = True,
    foreach: bool | None = None,
) -> tuple[TrustRecords, Tensor | None]:
    """Functional TVLARS (see :class:`TVLARS`): increments ``state_steps``, then a LARS step whose
    trust ratio is multiplied by phi(t). Returns the trust ratios applied and phi (0-dim) of the
    first adapted param, or ``None`` when ``layer_adaptation`` is false (phi is then not applied).
    """
    phi = partial(
        tvlars_phi, lmbda=lmbda, alpha=alpha, delay_steps=delay_steps, min_scale=min_scale
    )
    return lars(
        params,
        grads,
        momentum_buffers,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        trust_coefficient=trust_coefficient,
        eps=eps,
        nesterov=nesterov,
        layer_adaptation=layer_adaptation,
        foreach=foreach,
        state_steps=state_steps,
        trust_scale_fn=phi,
    )
