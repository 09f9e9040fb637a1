"""Split a model's parameters into a decayed, layer-adapted group and a plain group.

LARS (You, Gitman, Ginsburg 2017, arXiv:1708.03888) and LAMB (You et al. 2020, arXiv:1904.00962)
are usually run with biases and normalisation parameters excluded from weight decay and from the
layer-wise trust ratio: those tensors are tiny, their norms say little about a useful step size,
and decaying a BatchNorm scale towards 0 only hurts. The two switches stay separate in the group
(`weight_decay` and `layer_adaptation`), so a caller can change one without the other.

Normalisation layers are found by *module type*, never by parameter name: torchvision's ResNet
names the BatchNorm of a shortcut `downsample.1`, which name-based rules (`"bn" in name`) miss.

    groups = param_groups(model, weight_decay=5e-5, verbose=True)   # prints a summary
    optimizer = lars.LARS(groups, lr=9.0)

Each group holds only the `params` list and scalar/bool options: Horovod's
`broadcast_optimizer_state` turns every group option into a tensor, so no strings or names.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["NORM_MODULE_TYPES", "param_group_counts", "param_group_summary", "param_groups"]

# _NormBase covers BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d and their Lazy forms.
# LocalResponseNorm and CrossMapLRN2d hold no parameters; listed so the intent is explicit.
NORM_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    _NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.CrossMapLRN2d,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Ids of every parameter owned by a normalisation module or registered as a `bias`."""
    ids: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, NORM_MODULE_TYPES)
        # recurse=False: only the parameters this module registers itself, under their own names.
        for name, param in module.named_parameters(recurse=False):
            if is_norm or name == "bias":
                ids.add(id(param))
    return ids


def param_groups(
    model: nn.Module, weight_decay: float, *, verbose: bool = False
) -> list[dict[str, object]]:
    """Return the optimizer groups `[decayed weights, biases and normalisation parameters]`.

    Group 0: every other trainable parameter (convolution and linear weights, embeddings),
    `{"params": [...], "weight_decay": weight_decay, "layer_adaptation": True}`.
    Group 1: parameters registered under the name `bias` by any module, and every parameter of a
    module in `NORM_MODULE_TYPES`, `{"params": [...], "weight_decay": 0.0,
    "layer_adaptation": False}`.

    A parameter shared by several modules (tied weights) appears once, in group 1 if any of its
    owners makes it a bias or normalisation parameter. Parameters with `requires_grad=False` are
    left out. Order inside a group follows `model.parameters()`. Empty groups are dropped. With
    `verbose=True` the summary of `param_group_summary` is printed (call it on rank 0 only).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups expects an nn.Module, got {type(model).__name__}")
    weight_decay = float(weight_decay)
    if not weight_decay >= 0.0:  # also rejects NaN
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")

    no_decay = _no_decay_ids(model)
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
    """A few lines for start-up logs: tensors and parameters per group, and the model's total.

    Example (torchvision resnet50, weight_decay=5e-5)::

        param group 0: 54 tensors, 25,502,912 parameters (weight_decay=5e-05, layer_adaptation=True)
        param group 1: 107 tensors, 54,120 parameters (weight_decay=0.0, layer_adaptation=False)
        model: 161 trainable tensors, 25,557,032 parameters; 161 tensors in the groups

    The last line makes a parameter missing from the groups visible at a glance.
    """
    groups = list(groups)
    lines = []
    for index, (group, (tensors, numel)) in enumerate(zip(groups, param_group_counts(groups))):
        options = ", ".join(f"{key}={value}" for key, value in group.items() if key != "params")
        lines.append(f"param group {index}: {tensors} tensors, {numel:,} parameters ({options})")
    trainable = [p for p in model.parameters() if p.requires_grad]
    in_groups = {id(p) for group in groups for p in group["params"]}  # type: ignore[attr-defined]
    lines.append(
        f"model: {len(trainable)} trainable tensors, {sum(p.numel() for p in trainable):,} "
        f"parameters; {sum(1 for p in trainable if id(p) in in_groups)} tensors in the groups"
    )
    return "\n".join(lines)
