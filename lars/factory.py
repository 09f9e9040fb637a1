"""Build an optimizer by name from one flat set of hyper-parameters.

    groups = lars.param_groups(model, weight_decay=5e-5)
    optimizer = build_optimizer("lars", groups, lr=9.0, momentum=0.9, trust_coefficient=1e-3)
    skipped = unused_hyperparameters("adam", {"lr": 1e-3, "momentum": 0.9})   # ["momentum"]

Every key of `hyper` has one meaning across all optimizers, so a trainer can pass everything it
parsed and let each optimizer take what it understands. A key whose value is None is ignored,
which leaves the optimizer's own default (LARS's `eps` is 0, LAMB's 1e-6, Adam's 1e-8: pass None
rather than one number for all). A key the chosen optimizer does not use is skipped and listed by
`unused_hyperparameters` (and logged at INFO); a key no optimizer knows is a ValueError, since it
is almost always a typo. Values are validated here for every optimizer, torch.optim ones included.

RMSprop's smoothing constant is `rmsprop_alpha` (passed to it as `alpha`): plain `alpha` is
TVLARS's phi offset, and handing TVLARS's alpha = 1 to RMSprop would freeze its square average.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.optim import Optimizer

__all__ = ["HYPERPARAMETERS", "OPTIMIZERS", "build_optimizer", "unused_hyperparameters"]

logger = logging.getLogger(__name__)

OPTIMIZERS = ("lars", "tvlars", "lamb", "sgd", "adam", "adamw", "adagrad", "rmsprop")

_LARS_KEYS = ("lr", "momentum", "weight_decay", "trust_coefficient", "eps", "nesterov")
_ADAM_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad")

# The hyper-parameters each optimizer accepts (factory names; see _CONSTRUCTOR_NAME).
HYPERPARAMETERS: dict[str, tuple[str, ...]] = {
    "lars": _LARS_KEYS,
    "tvlars": (*_LARS_KEYS, "lmbda", "alpha", "delay_steps", "min_scale"),
    "lamb": ("lr", "betas", "eps", "weight_decay"),
    "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
    "adam": _ADAM_KEYS,
    "adamw": _ADAM_KEYS,
    "adagrad": ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"),
    "rmsprop": ("lr", "rmsprop_alpha", "eps", "weight_decay", "momentum", "centered"),
}

# Factory names that differ from the constructor's argument name.
_CONSTRUCTOR_NAME = {"rmsprop_alpha": "alpha"}


def _number(key: str, value: Any, *, low: float, high: float, closed_high: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    value = float(value)
    inside_high = value <= high if closed_high else value < high
    if not (math.isfinite(value) and value >= low and inside_high):
        upper = f"{high}]" if closed_high else f"{high})"
        raise ValueError(f"{key} must lie in [{low}, {upper}, got {value}")
    return value


def _non_negative(key: str, value: Any) -> float:
    return _number(key, value, low=0.0, high=math.inf, closed_high=False)


def _positive(key: str, value: Any) -> float:
    value = _non_negative(key, value)
    if value == 0:
        raise ValueError(f"{key} must be > 0, got {value}")
    return value


def _unit_interval_open(key: str, value: Any) -> float:  # [0, 1)
    return _number(key, value, low=0.0, high=1.0, closed_high=False)


def _unit_interval_closed(key: str, value: Any) -> float:  # [0, 1]
    return _number(key, value, low=0.0, high=1.0, closed_high=True)


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be True or False, got {value!r}")
    return value


def _betas(key: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{key} must be a pair (beta1, beta2), got {value!r}")
    return (_unit_interval_open(f"{key}[0]", value[0]), _unit_interval_open(f"{key}[1]", value[1]))


_VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "lr": _non_negative,
    "momentum": _unit_interval_open,
    "weight_decay": _non_negative,
    "trust_coefficient": _positive,
    "eps": _non_negative,
    "nesterov": _flag,
    "lmbda": _non_negative,
    "alpha": _positive,  # TVLARS: phi <= 1 / alpha + min_scale, so alpha = 0 is unbounded
    "delay_steps": _non_negative,  # optimizer steps; phi is continuous, so a fraction is fine
    "min_scale": _non_negative,
    "betas": _betas,
    "dampening": _unit_interval_closed,
    "amsgrad": _flag,
    "lr_decay": _non_negative,
    "initial_accumulator_value": _non_negative,
    "rmsprop_alpha": _unit_interval_closed,
    "centered": _flag,
}


def _canonical(name: str) -> str:
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in HYPERPARAMETERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    return key


def _check_known(hyper: Mapping[str, Any]) -> None:
    unknown = sorted(set(hyper) - set(_VALIDATORS))
    if unknown:
        raise ValueError(
            f"unknown hyper-parameter(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(_VALIDATORS))}"
        )


def unused_hyperparameters(name: str, hyper: Mapping[str, Any]) -> list[str]:
    """Sorted keys of `hyper` (None values aside) that optimizer `name` does not use."""
    accepted = HYPERPARAMETERS[_canonical(name)]
    _check_known(hyper)
    return sorted(key for key, value in hyper.items() if value is not None and key not in accepted)


def _optimizer_class(name: str) -> type[Optimizer]:
    if name in ("lars", "tvlars", "lamb"):
        # Imported here so that this module (and its torch.optim half) never depends on the
        # import order of the package.
        from lars import optim as lars_optim

        return {"lars": lars_optim.LARS, "tvlars": lars_optim.TVLARS, "lamb": lars_optim.LAMB}[name]
    return {
        "sgd": torch.optim.SGD,
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "adagrad": torch.optim.Adagrad,
        "rmsprop": torch.optim.RMSprop,
    }[name]


def build_optimizer(
    name: str, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], **hyper: Any
) -> Optimizer:
    """Construct optimizer `name` (one of `OPTIMIZERS`) over `params` with the keys it accepts.

    `params` is what torch optimizers take: tensors or param-group dicts, e.g.
    `lars.param_groups(model, weight_decay)`; options the groups carry override `hyper`.
    Accepted keys per name are in `HYPERPARAMETERS`; LARS, TVLARS and LAMB are `lars.optim`'s
    (arguments and update equations: DESIGN.md, "The optimizers"). Raises ValueError naming the
    optimizer or key for an unknown name or key, and for invalid values: lr, weight_decay, eps,
    lmbda, min_scale, delay_steps, lr_decay, initial_accumulator_value < 0 or not finite;
    momentum or a beta outside [0, 1); dampening or rmsprop_alpha outside [0, 1];
    trust_coefficient or alpha <= 0; nesterov, amsgrad, centered not bool; nesterov for sgd
    without momentum. TypeError if `params` is an nn.Module.
    """
    key = _canonical(name)
    if isinstance(params, nn.Module):
        raise TypeError(
            "build_optimizer takes parameters, not a module: pass "
            "lars.param_groups(model, weight_decay) or model.parameters()"
        )
    _check_known(hyper)
    accepted = HYPERPARAMETERS[key]
    kwargs = {
        _CONSTRUCTOR_NAME.get(k, k): _VALIDATORS[k](k, v)
        for k, v in hyper.items()
        if v is not None and k in accepted
    }
    if (
        key == "sgd"
        and kwargs.get("nesterov")
        and (kwargs.get("momentum", 0.0) == 0 or kwargs.get("dampening", 0.0) != 0)
    ):
        raise ValueError("nesterov=True for sgd needs momentum > 0 and dampening = 0")
    unused = unused_hyperparameters(key, hyper)
    if unused:
        logger.info("optimizer %s does not use: %s (ignored)", key, ", ".join(unused))
    return _optimizer_class(key)(params, **kwargs)
