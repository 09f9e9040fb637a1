"""The LARS update rules behind :func:`lars.optim.lars.lars`: a per-tensor loop (the reference)
and a multi-tensor ``torch._foreach_*`` implementation of each, for one param group.

Rules (notation of ``DESIGN.md``; "adapted" is a group with ``layer_adaptation=True``, s the
optional trust scale, e.g. TVLARS's phi(t); every fall-back to 1 is a ``torch.where``):

``you2017`` (You, Gitman & Ginsburg 2017, Algorithm 1)::

    d = g + wd w ; trust = s * eta ||w|| / (||g|| + wd ||w|| + eps)  (1 if ||w|| = 0 or ||g|| = 0)
    v = m v + lr trust d ; w = w - v     (Nesterov: w = w - (m v + lr trust d))

``nus`` (LARS-ImageNet-PyTorch's ``lars.py``)::

    adapted:  d = g + wd w ; trust = clamp(eta ||w|| / (||g|| + wd ||w|| + eps), 0, trust_clip)
    excluded: d = g ; trust = 1
    d = clamp(d, -update_clip, update_clip) ; buf = m buf + d ; w = w - lr trust buf

``barlowtwins`` (facebookresearch/barlowtwins; with norm_clip and s: the TVLARS authors' code)::

    adapted:  d = g + wd w ; trust = s eta min(||w||, norm_clip) / min(||d||, norm_clip)
              (1 if ||w|| = 0 or ||d|| = 0) ; d = trust d
    excluded: d = g
    mu = m mu + d ; w = w - lr mu

Buffers start at 0, so "buf = d on the first step" holds without a special case. A clip of
``None`` means no clamp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _fused
from ._common import (
    TrustRecords,
    TrustScaleFn,
    foreach_add_scaled,
    group_tensors,
    increment_steps,
    step_dtype,
    trust_where,
)

RULES = ("you2017", "nus", "barlowtwins")


@dataclass(frozen=True)
class Hyper:
    """One group's settings, as the rules read them."""

    rule: str
    lr: float
    momentum: float
    weight_decay: float
    trust_coefficient: float
    eps: float
    nesterov: bool
    layer_adaptation: bool
    trust_clip: float | None = None
    update_clip: float | None = None
    norm_clip: float | None = None
    trust_scale_fn: TrustScaleFn | None = None
    fused: bool = False  # the fused CPU kernel where it applies (lars.optim._fused)


def _norm(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x)


def _lars_ratio(h: Hyper, w_norm: Tensor, g_norm: Tensor) -> Tensor:
    """eta ||w|| / (||g|| + wd ||w|| + eps), element-wise over stacked norms."""
    denom = g_norm.add(w_norm, alpha=h.weight_decay) if h.weight_decay != 0.0 else g_norm
    if h.eps != 0.0:
        denom = denom + h.eps
    return w_norm.mul(h.trust_coefficient).div_(denom)


def _barlow_ratio(h: Hyper, w_norm: Tensor, d_norm: Tensor, scale: Tensor | None) -> Tensor:
    """s eta min(||w||, c) / min(||d||, c), falling back to 1 on a zero norm."""
    wn, dn = w_norm, d_norm
    if h.norm_clip is not None:
        wn, dn = wn.clamp(max=h.norm_clip), dn.clamp(max=h.norm_clip)
    ratio = wn.mul(h.trust_coefficient)
    if scale is not None:
        ratio = ratio * scale
    return trust_where(ratio / dn, w_norm, d_norm)


def single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    steps: list[Tensor] | None,
    h: Hyper,
) -> tuple[TrustRecords, Tensor | None]:
    """The reference: one tensor at a time, written as the equations read."""
    ratios: list[Tensor] = []
    first_scale = None
    for i, (p, g) in enumerate(zip(params, grads)):
        if steps is not None:
            steps[i].add_(1)
        scale = None
        if h.layer_adaptation and steps is not None and h.trust_scale_fn is not None:
            scale = h.trust_scale_fn(steps[i].to(step_dtype(p.dtype)))
            first_scale = scale if first_scale is None else first_scale
        buf = bufs[i] if h.momentum != 0.0 else None
        trust = _RULE_STEPS[h.rule](p, g, buf, scale, h)
        if trust is not None:
            ratios.append(trust)
    return ([(params, ratios)] if h.layer_adaptation else []), first_scale


def _you2017_step(p: Tensor, g: Tensor, buf: Tensor | None, scale, h: Hyper) -> Tensor | None:
    d = g.add(p, alpha=h.weight_decay) if h.weight_decay != 0.0 else g
    trust = None
    if h.layer_adaptation:
        w_norm, g_norm = _norm(p), _norm(g)
        trust = trust_where(_lars_ratio(h, w_norm, g_norm), w_norm, g_norm)
        if scale is not None:
            trust = trust * scale
        update = d * (h.lr * trust)
    else:
        update = d * h.lr
    if buf is not None:
        buf.mul_(h.momentum).add_(update)
        update = update.add(buf, alpha=h.momentum) if h.nesterov else buf
    p.sub_(update)
    return trust


def _nus_step(p: Tensor, g: Tensor, buf: Tensor | None, scale, h: Hyper) -> Tensor | None:
    d, trust = g, None
    if h.layer_adaptation:
        d = g.add(p, alpha=h.weight_decay) if h.weight_decay != 0.0 else g
        w_norm, g_norm = _norm(p), _norm(g)
        ratio = _lars_ratio(h, w_norm, g_norm)
        if h.trust_clip is not None:
            ratio = ratio.clamp(0.0, h.trust_clip)
        trust = trust_where(ratio, w_norm, g_norm)
        if scale is not None:
            trust = trust * scale
    if h.update_clip is not None:
        d = d.clamp(-h.update_clip, h.update_clip)
    if buf is not None:
        d = buf.mul_(h.momentum).add_(d)
    p.sub_(d * (h.lr * trust) if trust is not None else d * h.lr)
    return trust


def _barlow_step(p: Tensor, g: Tensor, buf: Tensor | None, scale, h: Hyper) -> Tensor | None:
    d, trust = g, None
    if h.layer_adaptation:
        d = g.add(p, alpha=h.weight_decay) if h.weight_decay != 0.0 else g
        trust = _barlow_ratio(h, _norm(p), _norm(d), scale)
        d = d * trust
    if buf is not None:
        d = buf.mul_(h.momentum).add_(d)
    p.sub_(d * h.lr)
    return trust


_RULE_STEPS = {"you2017": _you2017_step, "nus": _nus_step, "barlowtwins": _barlow_step}


def multi_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    steps: list[Tensor] | None,
    h: Hyper,
) -> tuple[TrustRecords, Tensor | None]:
    """All tensors of a (device, dtype) bucket at once; in-place passes, p.grad only read."""
    records: TrustRecords = []
    first_scale = None
    momentum = h.momentum != 0.0
    lists: list[list[Tensor]] = [params, grads] + ([bufs] if momentum else [])
    if steps is not None:
        lists.append(steps)
    n_state = 3 if momentum else 2  # params, grads and bufs: what the kernel reads as arrays
    fusable = _fused.fusable(lists[:n_state], steps) if h.fused else [False] * len(params)
    for (_, dtype, fused), bucket in group_tensors(lists, key=fusable.__getitem__).items():
        b_params, b_grads = bucket[0], bucket[1]
        b_bufs = bucket[2] if momentum else []
        b_steps = bucket[-1] if steps is not None else None
        scale = None
        if b_steps is not None:
            increment_steps(b_steps)
            if h.layer_adaptation and h.trust_scale_fn is not None:
                scale = h.trust_scale_fn(torch.stack(b_steps).to(step_dtype(dtype)))
                first_scale = scale[0] if first_scale is None else first_scale
        rule = _fused_step if fused else _MULTI_RULES[h.rule]
        trust = rule(b_params, b_grads, b_bufs, scale, h)
        if trust is not None:
            records.append((b_params, trust))
    return records, first_scale


def _fused_step(params, grads, bufs, scale, h: Hyper) -> Tensor | None:
    """The whole update of a bucket in the fused CPU kernel: two passes over each tensor."""
    inf = math.inf
    trust = _fused.load().lars_step(
        params,
        grads,
        bufs,
        _fused.empty_scale() if scale is None else scale.to(torch.float64),
        _FUSED_RULES[h.rule],
        h.lr,
        h.momentum,
        h.weight_decay,
        h.trust_coefficient,
        h.eps,
        h.nesterov,
        h.layer_adaptation,
        inf if h.trust_clip is None else h.trust_clip,
        inf if h.update_clip is None else h.update_clip,
        inf if h.norm_clip is None else h.norm_clip,
    )
    return trust if h.layer_adaptation else None


def _multi_you2017(params, grads, bufs, scale, h: Hyper) -> Tensor | None:
    lr_trust, trust = None, None  # lr * trust, one 0-dim entry per tensor, when adapted
    if h.layer_adaptation:
        # Norms of all tensors at once, stacked so the ratio arithmetic is a few vector ops.
        w_norm = torch.stack(torch._foreach_norm(params))
        g_norm = torch.stack(torch._foreach_norm(grads))
        trust = trust_where(_lars_ratio(h, w_norm, g_norm), w_norm, g_norm)
        if scale is not None:
            trust.mul_(scale)
        lr_trust = list(torch.mul(trust, h.lr).unbind(0))
    _foreach_momentum_update(params, grads, bufs, lr_trust, h)
    return trust


def _foreach_momentum_update(params, grads, bufs, lr_trust: list[Tensor] | None, h: Hyper):
    """v = m v + s (g + wd w); w = w - v (Nesterov: w = w - (m v + s (g + wd w))), with
    s = lr_trust[i] (0-dim), or lr when lr_trust is None. No temporary the size of the model."""
    base = 1.0 if lr_trust is not None else h.lr
    wd, m = h.weight_decay, h.momentum
    if m != 0.0:
        torch._foreach_mul_(bufs, m)
        foreach_add_scaled(bufs, lr_trust, base, grads)
        if wd != 0.0:
            foreach_add_scaled(bufs, lr_trust, base * wd, params)
        if not h.nesterov:
            torch._foreach_sub_(params, bufs)
            return
    # w -= [m * v +] s * (g + wd * w): the decay term first, while w still holds the old weights.
    if wd != 0.0:
        foreach_add_scaled(params, lr_trust, -base * wd, params)
    if m != 0.0:
        torch._foreach_add_(params, bufs, alpha=-m)
    foreach_add_scaled(params, lr_trust, -base, grads)


def _multi_nus(params, grads, bufs, scale, h: Hyper) -> Tensor | None:
    d, trust = grads, None
    if h.layer_adaptation:
        w_norm = torch.stack(torch._foreach_norm(params))
        g_norm = torch.stack(torch._foreach_norm(grads))
        ratio = _lars_ratio(h, w_norm, g_norm)
        if h.trust_clip is not None:
            ratio = ratio.clamp_(0.0, h.trust_clip)
        trust = trust_where(ratio, w_norm, g_norm)
        if scale is not None:
            trust.mul_(scale)
        if h.weight_decay != 0.0:
            d = list(torch._foreach_add(grads, params, alpha=h.weight_decay))
    if h.update_clip is not None:
        if d is grads:  # p.grad is only read: the first clamp writes a new list
            d = list(torch._foreach_clamp_min(grads, -h.update_clip))
        else:
            torch._foreach_clamp_min_(d, -h.update_clip)
        torch._foreach_clamp_max_(d, h.update_clip)
    if h.momentum != 0.0:
        torch._foreach_mul_(bufs, h.momentum)
        torch._foreach_add_(bufs, d)
        d = bufs
    lr_trust = None if trust is None else list(torch.mul(trust, h.lr).unbind(0))
    foreach_add_scaled(params, lr_trust, -1.0 if lr_trust is not None else -h.lr, d)
    return trust


def _multi_barlow(params, grads, bufs, scale, h: Hyper) -> Tensor | None:
    d, trust = grads, None
    if h.layer_adaptation:
        if h.weight_decay != 0.0:
            d = list(torch._foreach_add(grads, params, alpha=h.weight_decay))
        w_norm = torch.stack(torch._foreach_norm(params))
        d_norm = torch.stack(torch._foreach_norm(d))
        trust = _barlow_ratio(h, w_norm, d_norm, scale).to(w_norm.dtype)
    per_tensor = None if trust is None else list(trust.unbind(0))
    if h.momentum != 0.0:
        torch._foreach_mul_(bufs, h.momentum)
        foreach_add_scaled(bufs, per_tensor, 1.0, d)  # mu = m mu + trust d
        torch._foreach_add_(params, bufs, alpha=-h.lr)
    else:
        foreach_add_scaled(params, per_tensor, -h.lr, d)
    return trust


_MULTI_RULES = {"you2017": _multi_you2017, "nus": _multi_nus, "barlowtwins": _multi_barlow}
_FUSED_RULES = {"you2017": 0, "nus": 1, "barlowtwins": 2}  # the kernel's LarsRule
