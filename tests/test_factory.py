"""build_optimizer: the right class, the right hyper-parameters, clear errors."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

from lars.factory import HYPERPARAMETERS, OPTIMIZERS, build_optimizer, unused_hyperparameters
from lars.param_groups import param_groups


def _params():
    return [nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.zeros(3))]


def _defaults(optimizer, keys):
    return {key: optimizer.defaults[key] for key in keys}


def test_names():
    assert OPTIMIZERS == (
        "lars", "tvlars", "lamb", "sgd", "adam", "adamw", "adagrad", "adagradnorm", "rmsprop"
    )  # fmt: skip
    assert set(HYPERPARAMETERS) == set(OPTIMIZERS)


@pytest.mark.parametrize(
    "name, cls, hyper",
    [
        ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)),
        ("adam", torch.optim.Adam, dict(lr=1e-3, betas=(0.8, 0.99), eps=1e-7, amsgrad=True)),
        ("adamw", torch.optim.AdamW, dict(lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)),
        ("adagrad", torch.optim.Adagrad, dict(lr=0.01, lr_decay=1e-4, eps=1e-9)),
        ("rmsprop", torch.optim.RMSprop, dict(lr=0.01, momentum=0.5, eps=1e-6, centered=True)),
    ],
)
def test_torch_optimizers(name, cls, hyper):
    optimizer = build_optimizer(name, _params(), **hyper)
    assert type(optimizer) is cls
    assert _defaults(optimizer, hyper) == hyper
    assert unused_hyperparameters(name, hyper) == []


def test_lars():
    from lars.optim import LARS

    hyper = dict(
        lr=9.0, momentum=0.8, weight_decay=5e-5, trust_coefficient=0.02, eps=1e-9, nesterov=True
    )
    optimizer = build_optimizer("lars", _params(), **hyper)
    assert type(optimizer) is LARS
    assert _defaults(optimizer, hyper) == hyper


def test_adagradnorm():
    from lars.optim import AdaGradNorm

    hyper = dict(lr=0.5, weight_decay=1e-4)
    optimizer = build_optimizer("adagradnorm", _params(), **hyper, momentum=0.9)
    assert type(optimizer) is AdaGradNorm
    assert _defaults(optimizer, hyper) == hyper
    assert unused_hyperparameters("adagradnorm", dict(momentum=0.9)) == ["momentum"]


def test_tvlars():
    from lars.optim import TVLARS

    hyper = dict(lr=5.0, momentum=0.9, lmbda=1e-3, alpha=0.1, delay_steps=100, min_scale=1e-3)
    optimizer = build_optimizer("tvlars", _params(), **hyper)
    assert type(optimizer) is TVLARS
    assert _defaults(optimizer, hyper) == hyper


def test_lamb_and_none_values():
    from lars.optim import LAMB

    hyper = dict(lr=0.01, betas=(0.85, 0.99), weight_decay=0.02, eps=None)
    optimizer = build_optimizer("lamb", _params(), **hyper)
    assert type(optimizer) is LAMB
    assert _defaults(optimizer, ["lr", "betas", "weight_decay"]) == dict(
        lr=0.01, betas=(0.85, 0.99), weight_decay=0.02
    )
    assert optimizer.defaults["eps"] == 1e-6  # None keeps LAMB's own default


def test_name_is_case_insensitive():
    assert type(build_optimizer("SGD", _params(), lr=0.1)) is torch.optim.SGD


def test_unused_hyperparameters_are_skipped_and_reported(caplog):
    hyper = dict(lr=1e-3, momentum=0.9, trust_coefficient=0.001, nesterov=None)
    assert unused_hyperparameters("adam", hyper) == ["momentum", "trust_coefficient"]
    with caplog.at_level(logging.INFO, logger="lars.factory"):
        optimizer = build_optimizer("adam", _params(), **hyper)
    assert type(optimizer) is torch.optim.Adam
    assert "momentum" not in optimizer.defaults
    assert "momentum, trust_coefficient" in caplog.text
    # An unused key is ignored, even with a value that would be invalid for its user.
    build_optimizer("adam", _params(), lr=1e-3, momentum=5.0)


def test_rmsprop_alpha_is_not_tvlars_alpha():
    optimizer = build_optimizer("rmsprop", _params(), lr=0.01, alpha=1.0)
    assert optimizer.defaults["alpha"] == 0.99  # torch's default: TVLARS's alpha is not passed
    assert unused_hyperparameters("rmsprop", dict(alpha=1.0)) == ["alpha"]
    optimizer = build_optimizer("rmsprop", _params(), lr=0.01, rmsprop_alpha=0.9)
    assert optimizer.defaults["alpha"] == 0.9


def test_param_groups_keep_their_own_options():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    optimizer = build_optimizer("sgd", param_groups(model, 1e-4), lr=0.1, weight_decay=0.5)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 0.0]
    assert [g["layer_adaptation"] for g in optimizer.param_groups] == [True, False]


def test_unknown_name():
    with pytest.raises(ValueError, match=r"'larz'.*lars, tvlars, lamb, sgd"):
        build_optimizer("larz", _params(), lr=0.1)
    with pytest.raises(ValueError, match="larz"):
        unused_hyperparameters("larz", {})


def test_unknown_hyperparameter():
    with pytest.raises(ValueError, match="momentun"):
        build_optimizer("sgd", _params(), lr=0.1, momentun=0.9)


@pytest.mark.parametrize(
    "name, hyper, key",
    [
        ("sgd", dict(lr=-0.1), "lr"),
        ("adam", dict(lr=-1e-3), "lr"),
        ("lars", dict(lr=float("nan")), "lr"),
        ("sgd", dict(lr=0.1, momentum=1.0), "momentum"),
        ("sgd", dict(lr=0.1, momentum=-0.1), "momentum"),
        ("lars", dict(lr=1.0, momentum=1.5), "momentum"),
        ("adamw", dict(lr=1e-3, weight_decay=-0.01), "weight_decay"),
        ("lars", dict(lr=1.0, weight_decay=-1e-4), "weight_decay"),
        ("lars", dict(lr=1.0, trust_coefficient=0.0), "trust_coefficient"),
        ("lars", dict(lr=1.0, eps=-1e-9), "eps"),
        ("lars", dict(lr=1.0, nesterov="yes"), "nesterov"),
        ("tvlars", dict(lr=1.0, lmbda=-1e-3), "lmbda"),
        ("tvlars", dict(lr=1.0, alpha=0.0), "alpha"),
        ("tvlars", dict(lr=1.0, delay_steps=-1), "delay_steps"),
        ("tvlars", dict(lr=1.0, delay_steps=float("inf")), "delay_steps"),
        ("tvlars", dict(lr=1.0, min_scale=-0.1), "min_scale"),
        ("lamb", dict(lr=1e-3, betas=(0.9, 1.0)), "betas"),
        ("adam", dict(lr=1e-3, betas=(0.9,)), "betas"),
        ("adagrad", dict(lr=0.01, initial_accumulator_value=-1.0), "initial_accumulator_value"),
        ("rmsprop", dict(lr=0.01, rmsprop_alpha=1.5), "rmsprop_alpha"),
        ("sgd", dict(lr=0.1, nesterov=True), "nesterov"),
    ],
)
def test_invalid_values_name_the_key(name, hyper, key):
    with pytest.raises(ValueError, match=rf"\b{key}\b"):
        build_optimizer(name, _params(), **hyper)


def test_module_instead_of_parameters():
    with pytest.raises(TypeError, match="param_groups"):
        build_optimizer("sgd", nn.Linear(2, 2), lr=0.1)
