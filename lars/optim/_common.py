"""Pieces shared by LARS, TVLARS and LAMB: argument checks, variants, step counts, bucketing.

Nothing here reads a tensor's value on the host: bucketing and the stride and complex checks look
only at tensor metadata (device, dtype, strides), which is known without a device sync and is
static under ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor

ParamsT = Union[Iterable[Tensor], Iterable[dict[str, Any]]]
# The trust ratios applied in one step: chunks of (params, one 0-dim ratio per param). On the
# foreach path the ratios are the 1-D tensor computed during the step (iterating it gives views).
TrustRecords = list[tuple[list[Tensor], Sequence[Tensor]]]
# Maps the 1-based step count t (a float tensor of any shape) to a factor of the trust ratio.
TrustScaleFn = Callable[[Tensor], Tensor]
# variant name -> {argument name: that variant's default}; an argument missing from a variant's
# entry does not apply to it.
VariantDefaults = Mapping[str, Mapping[str, float]]


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


def resolve_variant_args(group: dict[str, Any], table: VariantDefaults) -> None:
    """Fill the group's variant-specific arguments left at ``None`` with its variant's defaults.

    Called once per group when it is added, so the group (and so the state dict, and Horovod's
    ``Cls(param_groups)`` rebuild) carries concrete values. Unknown variants are left for
    :func:`check_variant` to report."""
    for name, default in table.get(group["variant"], {}).items():
        if group.get(name) is None:
            group[name] = default


def check_variant(group: dict[str, Any], variants: Sequence[str], table: VariantDefaults) -> None:
    """The variant is known, and every variant-specific argument that does not apply to it is
    ``None``; those that apply are > 0 (``inf`` switches a clamp off)."""
    variant = group["variant"]
    check_arg("variant", variant, variant in variants, "one of " + ", ".join(map(repr, variants)))
    applies = table[variant]
    for name in sorted({n for entry in table.values() for n in entry}):
        value = group.get(name)
        if value is None:
            continue
        if name not in applies:
            users = [v for v in variants if name in table[v]]
            raise ValueError(
                f"Invalid {name}: {value!r}; it applies only to variant "
                f"{' or '.join(map(repr, users))}, not {variant!r}"
            )
        check_arg(name, value, value > 0.0, f"{name} > 0 (inf for no clamp)")


def resolve_foreach(foreach: bool | None) -> bool:
    return True if foreach is None else bool(foreach)


def use_fused(foreach: bool | None, fused: bool | None) -> bool:
    """Whether the fused CPU kernel is asked for: ``fused=True``, or both left at ``None``
    (``foreach=False`` always means the per-tensor loop)."""
    return foreach is not False and (fused is True or (fused is None and foreach is None))


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


def new_step(p: Tensor) -> Tensor:
    """A step count t = 0 for parameter ``p``: a 0-dim float32 tensor on its device."""
    return torch.zeros((), dtype=torch.float32, device=p.device)


def step_on_device(state: dict[str, Any], p: Tensor) -> Tensor:
    """``state["step"]``, created at 0 or moved to ``p``'s device (e.g. after loading a state
    dict with ``map_location="cpu"``)."""
    step = state.get("step")
    if step is None:
        step = state["step"] = new_step(p)
    elif step.device != p.device:
        step = state["step"] = step.to(p.device)
    return step


def as_real(t: Tensor) -> Tensor:
    """A complex tensor as a real one with a trailing dimension of 2 (a view, as torch.optim
    treats complex parameters); a real tensor unchanged. Norms are unchanged by the view:
    ||z|| = sqrt(sum |z_k|^2) = sqrt(sum re_k^2 + im_k^2)."""
    return torch.view_as_real(t) if t.is_complex() else t


def same_strides(first: Tensor, others: Iterable[Tensor]) -> bool:
    """Every tensor of ``others`` has ``first``'s shape and strides (what fused kernels assume:
    they walk all operands with one index)."""
    return all(t.stride() == first.stride() and t.shape == first.shape for t in others)


def group_tensors(
    lists: Sequence[Sequence[Tensor]], key: Callable[[int], Any] | None = None
) -> dict[tuple[Any, ...], list[list[Tensor]]]:
    """Bucket parallel tensor lists by (device, dtype) of ``lists[0]`` (plus ``key(i)`` if given).

    A plain Python loop over metadata rather than ``Optimizer._group_tensors_by_device_and_dtype``:
    under ``torch.compile`` that helper puts everything in one bucket keyed ``(None, None)``,
    while this one gives the same buckets compiled and eager, with the real device and dtype.
    """
    buckets: dict[tuple[Any, ...], list[list[Tensor]]] = {}
    for i, first in enumerate(lists[0]):
        k = (first.device, first.dtype) + ((key(i),) if key is not None else ())
        bucket = buckets.get(k)
        if bucket is None:
            bucket = buckets[k] = [[] for _ in lists]
        for out, src in zip(bucket, lists):
            out.append(src[i])
    return buckets


def new_step_log() -> dict[str, Any]:
    """What the last ``step()`` leaves for logging: its trust records, the trust scale (TVLARS's
    phi) and the owners of complex parameters' real views. A dict mutated by item, because
    ``torch.compile`` replays item writes to it but drops attribute writes on an optimizer."""
    return {"records": [], "scale": None, "owners": {}}


def record_trust_ratios(
    records: TrustRecords, owners: dict[int, Tensor] | None = None
) -> list[tuple[Tensor, Tensor]]:
    """Flatten the records to (param, ratio); ``owners`` maps the id of a real view of a complex
    parameter back to the parameter."""
    pairs = [(p, ratio) for params, ratios in records for p, ratio in zip(params, ratios)]
    if owners:
        pairs = [(owners.get(id(p), p), ratio) for p, ratio in pairs]
    return pairs


def trust_where(ratio: Tensor, *norms: Tensor) -> Tensor:
    """``ratio`` where every norm is > 0, else 1, without a host sync (``torch.where`` instead of
    a Python ``if``: the fall-back for a zero weight or gradient must not read a value)."""
    ok = norms[0] > 0
    for n in norms[1:]:
        ok = torch.logical_and(ok, n > 0)
    return torch.where(ok, ratio, 1.0)


def foreach_add_scaled(
    dst: list[Tensor], per_tensor: list[Tensor] | None, factor: float, src: list[Tensor]
) -> None:
    """dst[i] += factor * per_tensor[i] * src[i], or dst[i] += factor * src[i] when per_tensor is
    None. The per-tensor factors stay on the device as 0-dim tensors, passed as addcmul's tensor1,
    the operand for which CUDA's multi-tensor fast path accepts 0-dim tensors."""
    if per_tensor is None:
        torch._foreach_add_(dst, src, alpha=factor)
    else:
        torch._foreach_addcmul_(dst, per_tensor, src, value=factor)
