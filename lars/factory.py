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

import importlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.optim import Optimizer

from lars.checks import FLAG_TO_HYPERPARAMETER, HYPERPARAMETER_CHECKS

__all__ = [
    "HYPERPARAMETERS",
    "OPTIMIZERS",
    "OPTIMIZER_SPECS",
    "OptimizerSpec",
    "build_optimizer",
    "unused_hyperparameters",
]

logger = logging.getLogger(__name__)


def _lars_class(name: str) -> Callable[[], type[Optimizer]]:
    # Imported on first use, so that this module (and its torch.optim half) never depends on
    # the import order of the package.
    return lambda: getattr(importlib.import_module("lars.optim"), name)


def _sgd_check(kwargs: dict) -> None:
    if kwargs.get("nesterov") and (
        kwargs.get("momentum", 0.0) == 0 or kwargs.get("dampening", 0.0) != 0
    ):
        raise ValueError("nesterov=True for sgd needs momentum > 0 and dampening = 0")


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything the project knows about one optimizer; adding an optimizer is one record."""

    name: str
    load: Callable[[], type[Optimizer]]  # the class, imported on first use
    hyperparameters: tuple[str, ...]  # the factory keys it accepts
    base_lr: float  # --base-lr when not given, for the reference batch
    schedule: str = "poly"  # --schedule when not given
    lr_power: float = 1.0  # --lr-power when not given
    warmup_epochs: float | None = None  # --warmup-epochs when not given (None: the dataset's)
    schedules: tuple[str, ...] = ()  # the schedules it accepts (empty: every one)
    renames: Mapping[str, str] = field(default_factory=dict)  # factory key -> argument name
    check: Callable[[dict], None] | None = None  # checks across its arguments
    # --bn-bias-separately when not given: the LARS family's papers and reference code exclude
    # biases and normalisation parameters from weight decay and layer adaptation.
    bn_bias_separately: bool = False

    @property
    def flags(self) -> tuple[str, ...]:
        """The optimizer flags (argparse dests) this optimizer uses."""
        return tuple(f for f, key in FLAG_TO_HYPERPARAMETER.items() if key in self.hyperparameters)

    @property
    def variants(self) -> tuple[str, ...]:
        """Its published variants, the default first (`VARIANTS` of the class; none: ())."""
        return tuple(self.load().VARIANTS) if "variant" in self.hyperparameters else ()


_LARS_KEYS = ("lr", "momentum", "weight_decay", "trust_coefficient", "eps", "nesterov", "variant")
_ADAM_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad")
_LAMB_KEYS = ("lr", "betas", "eps", "weight_decay", "variant")
_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
_ADAGRAD_KEYS = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")
_RMSPROP_KEYS = ("lr", "rmsprop_alpha", "eps", "weight_decay", "momentum", "centered")
_RMS = {"rmsprop_alpha": "alpha"}  # RMSprop's own name (see the module docstring)
# Layer-wise adaptive optimizers take rates two orders larger than SGD because
# eta x ||w|| / ||g|| scales them down; power 2 is the LARS paper's polynomial decay.
_SPECS = (
    OptimizerSpec(
        "lars", _lars_class("LARS"), _LARS_KEYS, 2.0, lr_power=2.0, bn_bias_separately=True
    ),
    OptimizerSpec(
        "tvlars",
        _lars_class("TVLARS"),
        (*_LARS_KEYS, "lmbda", "alpha", "delay_steps", "min_scale"),
        2.0,
        schedule="none",  # phi is its schedule
        lr_power=2.0,
        warmup_epochs=0.0,  # its early phase is plain LARS: no warm-up needed
        schedules=("none", "constant"),
        bn_bias_separately=True,
    ),
    OptimizerSpec("lamb", _lars_class("LAMB"), _LAMB_KEYS, 0.01, bn_bias_separately=True),
    OptimizerSpec("sgd", lambda: torch.optim.SGD, _SGD_KEYS, 0.1, check=_sgd_check),
    OptimizerSpec("adam", lambda: torch.optim.Adam, _ADAM_KEYS, 0.001),
    OptimizerSpec("adamw", lambda: torch.optim.AdamW, _ADAM_KEYS, 0.001),
    OptimizerSpec("adagrad", lambda: torch.optim.Adagrad, _ADAGRAD_KEYS, 0.01),
    OptimizerSpec("rmsprop", lambda: torch.optim.RMSprop, _RMSPROP_KEYS, 0.01, renames=_RMS),
)
OPTIMIZER_SPECS: dict[str, OptimizerSpec] = {spec.name: spec for spec in _SPECS}
OPTIMIZERS = tuple(OPTIMIZER_SPECS)
# The hyper-parameters each optimizer accepts (factory names).
HYPERPARAMETERS: dict[str, tuple[str, ...]] = {s.name: s.hyperparameters for s in _SPECS}


def _spec(name: str) -> OptimizerSpec:
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in OPTIMIZER_SPECS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    return OPTIMIZER_SPECS[key]


def _check_known(hyper: Mapping[str, Any]) -> None:
    unknown = sorted(set(hyper) - set(HYPERPARAMETER_CHECKS))
    if unknown:
        raise ValueError(
            f"unknown hyper-parameter(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(HYPERPARAMETER_CHECKS))}"
        )


def unused_hyperparameters(name: str, hyper: Mapping[str, Any]) -> list[str]:
    """Sorted keys of `hyper` (None values aside) that optimizer `name` does not use."""
    accepted = _spec(name).hyperparameters
    _check_known(hyper)
    return sorted(key for key, value in hyper.items() if value is not None and key not in accepted)


def build_optimizer(
    name: str, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], **hyper: Any
) -> Optimizer:
    """Construct optimizer `name` (one of `OPTIMIZERS`) over `params` with the keys it accepts.

    `params` is what torch optimizers take: tensors or param-group dicts, e.g.
    `lars.param_groups(model, weight_decay)`; options the groups carry override `hyper`.
    Accepted keys per name are in `HYPERPARAMETERS`; LARS, TVLARS and LAMB are `lars.optim`'s
    (arguments and update equations: DESIGN.md, "The optimizers"). Raises ValueError naming the
    optimizer or key for an unknown name or key, and for a value outside its range (the ranges
    are `lars.checks.HYPERPARAMETER_CHECKS`), or nesterov for sgd without momentum. TypeError if
    `params` is an nn.Module.
    """
    spec = _spec(name)
    if isinstance(params, nn.Module):
        raise TypeError(
            "build_optimizer takes parameters, not a module: pass "
            "lars.param_groups(model, weight_decay) or model.parameters()"
        )
    _check_known(hyper)
    kwargs = {
        spec.renames.get(k, k): HYPERPARAMETER_CHECKS[k](k, v)
        for k, v in hyper.items()
        if v is not None and k in spec.hyperparameters
    }
    if spec.check is not None:
        spec.check(kwargs)
    unused = unused_hyperparameters(spec.name, hyper)
    if unused:
        logger.info("optimizer %s does not use: %s (ignored)", spec.name, ", ".join(unused))
    return spec.load()(params, **kwargs)
