"""Split a model's parameters into a decayed, layer-adapted group and a plain group.

LARS (You, Gitman, Ginsburg 2017, arXiv:1708.03888) and LAMB (You et al. 2020, arXiv:1904.00962)
are usually run with biases and normalisation parameters excluded from weight decay and from the
layer-wise trust ratio: those tensors are tiny, their norms say little about a useful step size,
and decaying a BatchNorm scale towards 0 only hurts. The same holds for every other vector
(`ndim <= 1`) and for the token, position-embedding, layer-scale and relative-position tables of
transformer models (see `NO_DECAY_NAMES`), which are excluded too. The two switches stay separate
in the group (`weight_decay` and `layer_adaptation`), so a caller can change one without the
other.

Normalisation layers are found by *module type*, never by parameter name: torchvision's ResNet
names the BatchNorm of a shortcut `downsample.1`, which name-based rules (`"bn" in name`) miss.

    groups = param_groups(model, weight_decay=5e-5, verbose=True)   # prints a summary
    optimizer = lars.LARS(groups, lr=9.0)

Each group holds only the `params` list and scalar/bool options, so that any version of Horovod's
`broadcast_optimizer_state` can broadcast them (older ones turned every option into a tensor).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = [
    "NORM_MODULE_TYPES",
    "NO_DECAY_NAMES",
    "no_decay_kinds",
    "param_group_counts",
    "param_group_summary",
    "param_groups",
]

# _NormBase covers BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d and their Lazy forms.
# LocalResponseNorm and CrossMapLRN2d hold no parameters; listed so the intent is explicit.
NORM_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    _NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.CrossMapLRN2d,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


# Parameters that get neither weight decay nor layer adaptation, by the name a module registers
# them under (its own name, not the dotted path: `features.1.0.layer_scale` is `layer_scale`).
# The torchvision transformer families: ViT's `class_token` and `encoder.pos_embedding`,
# MultiheadAttention's `in_proj_bias`, Swin's `relative_position_bias_table` (and V2's
# `logit_scale`), MaxViT's `relative_position_bias_table`, ConvNeXt's `layer_scale`; timm's
# spellings of the same tables too. Decaying a position table or a layer scale towards 0, or
# scaling its step by its norm, works against what it learns (ViT, Swin and ConvNeXt recipes
# exclude them).
NO_DECAY_NAMES: dict[str, str] = {
    "bias": "bias",
    "in_proj_bias": "bias",
    "class_token": "token",
    "cls_token": "token",
    "dist_token": "token",
    "mask_token": "token",
    "register_tokens": "token",
    "pos_embedding": "position embedding",
    "pos_embed": "position embedding",
    "relative_position_bias_table": "relative position table",
    "layer_scale": "layer scale",
    "logit_scale": "layer scale",
}


def no_decay_kinds(model: nn.Module) -> dict[int, str]:
    """For every parameter that skips weight decay and adaptation, its id -> kind.

    Kinds: `normalisation` (any parameter of a module in `NORM_MODULE_TYPES`), the kinds of
    `NO_DECAY_NAMES` (by registered name), and `ndim <= 1` (any other scalar or vector: gains,
    biases under other names). Everything else (convolution, linear and embedding matrices) is
    decayed and adapted.
    """
    kinds: dict[int, str] = {}
    for module in model.modules():
        is_norm = isinstance(module, NORM_MODULE_TYPES)
        # recurse=False: only the parameters this module registers itself, under their own names.
        for name, param in module.named_parameters(recurse=False):
            kind = "normalisation" if is_norm else NO_DECAY_NAMES.get(name)
            if kind is None and param.ndim <= 1:
                kind = "ndim <= 1"
            if kind is not None:
                kinds.setdefault(id(param), kind)
    return kinds


def param_groups(
    model: nn.Module, weight_decay: float, *, verbose: bool = False
) -> list[dict[str, object]]:
    """Return the optimizer groups `[decayed and adapted weights, excluded parameters]`.

    Group 0: every other trainable parameter (convolution, linear and attention projection
    matrices, embeddings), `{"params": [...], "weight_decay": weight_decay,
    "layer_adaptation": True}`.
    Group 1: the parameters of `no_decay_kinds(model)`: every parameter of a module in
    `NORM_MODULE_TYPES`, every parameter with `ndim <= 1` (biases, `in_proj_bias`, gains), and the
    tables named in `NO_DECAY_NAMES` (ViT's class token and position embedding, Swin's
    relative-position bias tables, ConvNeXt's layer scales, ...), `{"params": [...],
    "weight_decay": 0.0, "layer_adaptation": False}`.

    A parameter shared by several modules (tied weights) appears once, in group 1 if any of its
    owners excludes it. Parameters with `requires_grad=False` are left out. Order inside a group
    follows `model.parameters()`. Empty groups are dropped. With `verbose=True` the summary of
    `param_group_summary` is printed (call it on rank 0 only).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups expects an nn.Module, got {type(model).__name__}")
    weight_decay = float(weight_decay)
    if not weight_decay >= 0.0:  # also rejects NaN
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")

    no_decay = no_decay_kinds(model)
    decayed: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for param in model.parameters():  # yields each shared parameter once
        if not param.requires_grad:
            continue
        (plain if id(param) in no_decay else decayed).append(param)

    groups: list[dict[str, object]] = [
        {"params": decayed, "weight_decay": weight_decay, "layer_adaptation": True},
        {"params": plain, "weight_decay": 0.0, "layer_adaptation": False},
    ]
    groups = [group for group in groups if group["params"]]
    if verbose:
        print(param_group_summary(model, groups))
    return groups


def param_group_counts(groups: Iterable[dict[str, object]]) -> list[tuple[int, int]]:
    """`(number of tensors, number of scalar parameters)` for each group, in order."""
    counts = []
    for group in groups:
        params = list(group["params"])  # type: ignore[call-overload]
        counts.append((len(params), sum(p.numel() for p in params)))
    return counts


def param_group_summary(model: nn.Module, groups: Iterable[dict[str, object]]) -> str:
    """A few lines for start-up logs: tensors and parameters per group, what the groups without
    layer adaptation hold by kind (count and first names), and the model's total.

    Example (torchvision resnet50, weight_decay=5e-5)::

        param group 0: 54 tensors, 25,502,912 parameters (weight_decay=5e-05, layer_adaptation=True)
        param group 1: 107 tensors, 54,120 parameters (weight_decay=0.0, layer_adaptation=False)
          normalisation: 106 (bn1.weight, bn1.bias, layer1.0.bn1.weight, ...)
          bias: 1 (fc.bias)
        model: 161 trainable tensors, 25,557,032 parameters; 161 tensors in the groups

    The last line makes a parameter missing from the groups visible at a glance.
    """
    groups = list(groups)
    names = {id(p): name for name, p in model.named_parameters()}
    kinds = no_decay_kinds(model)
    lines = []
    for index, (group, (tensors, numel)) in enumerate(zip(groups, param_group_counts(groups))):
        options = ", ".join(f"{key}={value}" for key, value in group.items() if key != "params")
        lines.append(f"param group {index}: {tensors} tensors, {numel:,} parameters ({options})")
        if group.get("layer_adaptation", True) is False:
            lines += _kind_lines(group["params"], kinds, names)  # type: ignore[arg-type]
    trainable = [p for p in model.parameters() if p.requires_grad]
    in_groups = {id(p) for group in groups for p in group["params"]}  # type: ignore[attr-defined]
    lines.append(
        f"model: {len(trainable)} trainable tensors, {sum(p.numel() for p in trainable):,} "
        f"parameters; {sum(1 for p in trainable if id(p) in in_groups)} tensors in the groups"
    )
    return "\n".join(lines)


def _kind_lines(params: Iterable[nn.Parameter], kinds: dict[int, str], names: dict[int, str]):
    """`  kind: count (first three names, ...)` per kind, in order of first appearance."""
    by_kind: dict[str, list[str]] = {}
    for p in params:
        by_kind.setdefault(kinds.get(id(p), "other"), []).append(names.get(id(p), "?"))
    lines = []
    for kind, members in by_kind.items():
        shown = ", ".join(members[:3]) + (", ..." if len(members) > 3 else "")
        lines.append(f"  {kind}: {len(members)} ({shown})")
    return lines
