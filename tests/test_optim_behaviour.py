"""LARS, TVLARS and LAMB: arguments, state dicts, host syncs, Horovod's habits, TVLARS's phi."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from test_optim_reference import FOREACH_PATHS

from lars.optim import LAMB, LARS, TVLARS
from lars.optim.tvlars import tvlars_phi

SETTINGS = [
    (LARS, dict(lr=0.2, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.01)),
    (LARS, dict(lr=0.2, momentum=0.9, weight_decay=1e-2, nesterov=True, eps=1e-5)),
    (LARS, dict(lr=0.2, momentum=0.0, weight_decay=1e-2)),
    (TVLARS, dict(lr=0.2, weight_decay=1e-2, lmbda=0.3, alpha=0.5, delay_steps=2, min_scale=0.1)),
    (LAMB, dict(lr=0.01, weight_decay=1e-2)),
    (LAMB, dict(lr=0.01, eps=0.0)),
    (LAMB, dict(lr=0.01, weight_decay=1e-2, fused=False)),  # as without a fused Adam kernel
    (LARS, dict(lr=0.2, weight_decay=1e-2, trust_coefficient=0.01, variant="nus")),
    (LARS, dict(lr=0.2, momentum=0.0, weight_decay=1e-2, variant="nus", update_clip=0.05)),
    (LARS, dict(lr=0.2, weight_decay=1e-2, trust_coefficient=0.01, variant="barlowtwins")),
    (TVLARS, dict(lr=0.2, weight_decay=1e-2, lmbda=0.3, variant="authors")),
    (LAMB, dict(lr=0.01, weight_decay=1e-2, variant="nus")),
    (LAMB, dict(lr=0.01, variant="nus")),
    (LAMB, dict(lr=0.01, weight_decay=1e-2, variant="authors")),
]
PATHS = FOREACH_PATHS  # fused (the default), foreach, loop
OPTS = pytest.mark.parametrize(
    "cls,kwargs", SETTINGS, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(SETTINGS)]
)


def make_params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in [(6, 4), (6,), (3, 2, 2), (5,)]]
    params[3].zero_()  # a zero-initialised tensor, as the last BN weight of a residual block
    return [p.requires_grad_() for p in params]


def groups(params):
    return [
        {"params": params[:3]},
        {"params": params[3:], "weight_decay": 0.0, "layer_adaptation": False},
    ]


def set_grads(params, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


@OPTS
@PATHS
def test_state_dict_round_trip_is_bitwise(cls, kwargs, foreach):
    """Save after 3 steps, load into a fresh optimizer over copied params, run 3 more steps:
    identical to 6 uninterrupted steps (TVLARS's phi and LAMB's bias correction need t)."""
    straight = make_params()
    opt = cls(groups(straight), foreach=foreach, **kwargs)
    for step in range(6):
        set_grads(straight, step)
        opt.step()

    first = make_params()
    opt = cls(groups(first), foreach=foreach, **kwargs)
    for step in range(3):
        set_grads(first, step)
        opt.step()
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt = cls(groups(resumed), foreach=foreach, **kwargs)
    opt.load_state_dict(saved["optimizer"])
    for step in range(3, 6):
        set_grads(resumed, step)
        opt.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_tvlars_keeps_step_in_state_dict():
    params = make_params()
    opt = TVLARS(groups(params), lr=0.1)
    for step in range(4):
        set_grads(params, step)
        opt.step()
    steps = [s["step"] for s in opt.state_dict()["state"].values()]
    assert len(steps) == len(params) and all(torch.is_tensor(t) and float(t) == 4 for t in steps)


@OPTS
@PATHS
def test_step_never_syncs_with_the_host(cls, kwargs, foreach, monkeypatch):
    params = make_params()
    opt = cls(groups(params), foreach=foreach, **kwargs)
    set_grads(params, 0)
    params[2].grad.zero_()  # the fall-back branch of the trust ratio must not need a sync either

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside step()")

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for _ in range(2):
        opt.step()
    monkeypatch.undo()
    assert all(torch.isfinite(p).all() for p in params)


def zero_gradient_trust(cls, kwargs, opt) -> float:
    """The trust ratio of a step with g = 0 everywhere (||w|| < 10 for these tensors)."""
    wd, eta = kwargs.get("weight_decay", 0.0), kwargs.get("trust_coefficient", 0.001)
    variant = kwargs.get("variant")
    if cls is LAMB:  # u = wd * w: ratio 1 / wd; without weight decay u = 0 and the ratio falls back
        return 1.0 / wd if wd > 0 else 1.0
    if variant in ("barlowtwins", "authors"):  # d = wd * w, so only ||d|| = 0 falls back
        ratio = eta / wd if wd > 0 else 1.0
        return ratio * float(opt.last_phi) if variant == "authors" and wd > 0 else ratio
    return float(opt.last_phi) if cls is TVLARS else 1.0  # ||g|| = 0 falls back (times phi)


@OPTS
@PATHS
def test_horovod_broadcast_trick_all_grads_zero(cls, kwargs, foreach):
    """hvd.broadcast_optimizer_state zeroes every grad and calls step() once: no NaN, and the
    trust ratio falls back to 1 (TVLARS: to phi). LAMB's r is then wd * w, so its ratio is 1 / wd
    when wd > 0 and falls back to 1 otherwise."""
    params = make_params()
    opt = cls(groups(params), foreach=foreach, **kwargs)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    expected = zero_gradient_trust(cls, kwargs, opt)
    ratios = opt.last_trust_ratios()
    assert [id(p) for p, _ in ratios] == [id(p) for p in params[:3]]
    assert all(float(r) == pytest.approx(expected) for _, r in ratios)


@OPTS
@PATHS
def test_grad_is_never_modified_and_none_grads_are_skipped(cls, kwargs, foreach):
    params = make_params()
    opt = cls(groups(params), foreach=foreach, **kwargs)
    set_grads(params, 0)
    params[1].grad = None
    before = [p.detach().clone() for p in params]
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    opt.step()
    for p, g in zip(params, grads):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    assert torch.equal(params[1], before[1]) and params[1] not in opt.state
    assert not torch.equal(params[0], before[0])
    assert id(params[1]) not in [id(p) for p, _ in opt.last_trust_ratios()]


@pytest.mark.parametrize("cls", [LARS, TVLARS, LAMB])
def test_rebuilt_from_param_groups_without_lr(cls):
    """Horovod's DistributedOptimizer rebuilds the optimizer as cls(param_groups)."""
    params = make_params()
    opt = cls([{"params": params[:2], "lr": 0.2}, {"params": params[2:], "lr": 0.05}])
    rebuilt = cls(opt.param_groups)
    assert [g["lr"] for g in rebuilt.param_groups] == [0.2, 0.05]
    set_grads(params, 0)
    before = [p.detach().clone() for p in params]
    rebuilt.step()
    assert all(not torch.equal(p, b) for p, b in zip(params[:3], before[:3]))


@pytest.mark.parametrize("cls", [LARS, TVLARS, LAMB])
def test_missing_lr_is_a_clear_error(cls):
    params = make_params()
    with pytest.raises(ValueError, match=r"lr: param group 1 has no 'lr'"):
        cls([{"params": params[:2], "lr": 0.1}, {"params": params[2:]}])
    opt = cls(params[:2], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": params[2:], "lr": -1.0})
    assert len(opt.param_groups) == 1


INVALID = [
    (LARS, dict(lr=-0.1), "lr"),
    (LARS, dict(lr=float("nan")), "lr"),
    (LARS, dict(lr=0.1, momentum=-0.1), "momentum"),
    (LARS, dict(lr=0.1, momentum=1.0), "momentum"),
    (LARS, dict(lr=0.1, weight_decay=-1e-4), "weight_decay"),
    (LARS, dict(lr=0.1, trust_coefficient=0.0), "trust_coefficient"),
    (LARS, dict(lr=0.1, trust_coefficient=-1e-3), "trust_coefficient"),
    (LARS, dict(lr=0.1, eps=-1e-8), "eps"),
    (LARS, dict(lr=0.1, momentum=0.0, nesterov=True), "nesterov"),
    (TVLARS, dict(lr=-0.1), "lr"),
    (TVLARS, dict(lr=0.1, momentum=1.5), "momentum"),
    (TVLARS, dict(lr=0.1, lmbda=-0.1), "lmbda"),
    (TVLARS, dict(lr=0.1, alpha=0.0), "alpha"),
    (TVLARS, dict(lr=0.1, alpha=-1.0), "alpha"),
    (TVLARS, dict(lr=0.1, delay_steps=-1), "delay_steps"),
    (TVLARS, dict(lr=0.1, min_scale=-0.1), "min_scale"),
    (LAMB, dict(lr=-0.1), "lr"),
    (LAMB, dict(lr=0.1, betas=(1.0, 0.999)), r"betas\[0\]"),
    (LAMB, dict(lr=0.1, betas=(0.9, -0.1)), r"betas\[1\]"),
    (LAMB, dict(lr=0.1, eps=-1e-6), "eps"),
    (LAMB, dict(lr=0.1, weight_decay=-0.1), "weight_decay"),
    (LARS, dict(lr=0.1, variant="lars"), "variant"),
    (LARS, dict(lr=0.1, trust_clip=50.0), "trust_clip"),  # applies only to nus
    (LARS, dict(lr=0.1, variant="nus", trust_clip=0.0), "trust_clip"),
    (LARS, dict(lr=0.1, variant="nus", update_clip=-1.0), "update_clip"),
    (LARS, dict(lr=0.1, variant="nus", nesterov=True), "nesterov"),
    (LARS, dict(lr=0.1, variant="barlowtwins", eps=1e-5), "eps"),
    (TVLARS, dict(lr=0.1, variant="nus"), "variant"),
    (TVLARS, dict(lr=0.1, norm_clip=10.0), "norm_clip"),  # applies only to authors
    (TVLARS, dict(lr=0.1, variant="authors", norm_clip=0.0), "norm_clip"),
    (TVLARS, dict(lr=0.1, variant="authors", alpha=0.0), "alpha"),
    (LAMB, dict(lr=0.1, variant="paper"), "variant"),
    (LAMB, dict(lr=0.1, variant="nus", norm_clip=10.0), "norm_clip"),
    (LAMB, dict(lr=0.1, variant="authors", max_grad_norm=1.0), "max_grad_norm"),
    (LAMB, dict(lr=0.1, variant="nus", max_grad_norm=-1.0), "max_grad_norm"),
]


@pytest.mark.parametrize(
    "cls,kwargs,name", INVALID, ids=[f"{c.__name__}-{n}" for c, _, n in INVALID]
)
def test_invalid_arguments_raise_value_error_naming_them(cls, kwargs, name):
    with pytest.raises(ValueError, match=rf"Invalid {name}:"):
        cls(make_params(), **kwargs)
    # The same value carried by a param group (as Horovod passes them) is caught too.
    lr = kwargs.pop("lr", 0.1)
    bad = dict(kwargs, lr=lr)
    with pytest.raises(ValueError, match=rf"Invalid {name}:"):
        cls([dict(params=make_params(), **bad)])


@pytest.mark.parametrize("cls", [LARS, TVLARS, LAMB])
def test_old_state_dicts_without_new_keys_still_load(cls):
    params = make_params()
    opt = cls(params, lr=0.1)
    set_grads(params, 0)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    for group in state["param_groups"]:
        del group["layer_adaptation"], group["foreach"], group["fused"]
    fresh = cls(params, lr=0.1)
    fresh.load_state_dict(state)
    assert all(g["layer_adaptation"] is True and g["fused"] is None for g in fresh.param_groups)
    set_grads(params, 1)
    fresh.step()


def authors_phi(step_cnt: int, lmbda: float) -> float:
    """phi as computed by the TVLARS authors' released opt/tvlars.py (github.com/KhoiDOO/tvlars):
    1 / (0.1 + exp(lmbda * (step_cnt + 1))), step_cnt counting completed steps from 0."""
    return 1.0 / (0.1 + math.exp(lmbda * (step_cnt + 1)))


@PATHS
def test_authors_released_phi_is_reproduced(foreach):
    lmbda = 0.05
    params = make_params()
    opt = TVLARS(params, lr=0.1, lmbda=lmbda, alpha=0.1, foreach=foreach)
    for step_cnt in range(5):
        set_grads(params, step_cnt)
        opt.step()
        assert float(opt.last_phi) == pytest.approx(authors_phi(step_cnt, lmbda), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_phi_stays_finite_and_tends_to_min_scale_for_huge_t(dtype):
    t = torch.tensor([1.0, 50.0, 87.0, 88.0, 89.0, 100.0, 709.0, 710.0, 1e4, 1e7], dtype=dtype)
    phi = tvlars_phi(t, lmbda=1.0, alpha=1.0, delay_steps=0, min_scale=0.05)
    assert torch.isfinite(phi).all()
    assert (phi[1:] <= phi[:-1]).all()  # never rises again past the overflow point
    assert torch.equal(phi[-4:], torch.full((4,), 0.05, dtype=dtype))
    expected = [1.0 / (1.0 + math.exp(x)) + 0.05 if x < 700 else 0.05 for x in t.tolist()]
    torch.testing.assert_close(phi, torch.tensor(expected, dtype=dtype))


@PATHS
def test_tvlars_step_at_huge_t_is_finite(foreach):
    params = make_params()
    opt = TVLARS(params, lr=0.1, lmbda=1.0, min_scale=0.01, foreach=foreach)
    set_grads(params, 0)
    opt.step()
    for p in params:
        opt.state[p]["step"].fill_(1e7)
    opt.step()
    assert float(opt.last_phi) == pytest.approx(0.01)
    assert all(torch.isfinite(p).all() for p in params)


def test_tvlars_last_trust_ratio_is_lars_ratio_times_phi():
    params = make_params()
    lars = LARS([p.detach().clone().requires_grad_() for p in params], lr=0.1)
    tv = TVLARS(params, lr=0.1, lmbda=0.5, alpha=0.3)
    assert tv.last_phi is None
    for opt in (lars, tv):
        set_grads([p for g in opt.param_groups for p in g["params"]], 0)
        opt.step()
    phi = float(tv.last_phi)
    assert phi == pytest.approx(1.0 / (0.3 + math.exp(0.5)))
    for (_, a), (_, b) in zip(lars.last_trust_ratios(), tv.last_trust_ratios()):
        assert float(b) == pytest.approx(float(a) * phi, rel=1e-6)


VARIANT_SETTINGS = [
    (LARS, dict(variant="nus", trust_clip=3.0, update_clip=0.5), dict(trust_clip=3.0)),
    (LARS, dict(variant="nus"), dict(trust_clip=50.0, update_clip=10.0)),
    (LARS, dict(variant="barlowtwins"), dict(trust_clip=None)),
    (TVLARS, dict(variant="authors", lmbda=0.2), dict(alpha=0.1, norm_clip=10.0)),
    (TVLARS, dict(lmbda=0.2), dict(variant="paper", alpha=1.0, norm_clip=None)),
    (LAMB, dict(variant="nus"), dict(max_grad_norm=1.0, norm_clip=None)),
    (LAMB, dict(variant="authors", norm_clip=5.0), dict(norm_clip=5.0)),
    (LAMB, dict(), dict(variant="you2020", max_grad_norm=None)),
]


@pytest.mark.parametrize("cls,kwargs,group_values", VARIANT_SETTINGS, ids=str)
def test_variant_survives_horovods_rebuild(cls, kwargs, group_values):
    """Horovod rebuilds the optimizer as cls(param_groups): the variant and its arguments ride in
    the groups, with the variant's defaults filled in; the rebuilt one steps identically."""
    params = make_params()
    twin = [p.detach().clone().requires_grad_() for p in params]
    opt = cls(groups(params), lr=0.1, weight_decay=1e-2, **kwargs)
    rebuilt = cls(groups(twin), lr=0.1, weight_decay=1e-2, **kwargs)
    rebuilt = cls(rebuilt.param_groups)
    assert cls.VARIANTS[0] == rebuilt.defaults["variant"]
    for group in rebuilt.param_groups:
        assert group["variant"] == kwargs.get("variant", cls.VARIANTS[0])
        assert {k: group[k] for k in group_values} == group_values
    for step in range(3):
        set_grads(params, step)
        set_grads(twin, step)
        opt.step()
        rebuilt.step()
    for a, b in zip(params, twin):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [LARS, TVLARS, LAMB])
def test_variants_table_is_consistent(cls):
    """What the trainer reads: VARIANTS (first = default) and each variant's own arguments."""
    assert set(cls.VARIANT_DEFAULTS) == set(cls.VARIANTS)
    assert cls(make_params(), lr=0.1).param_groups[0]["variant"] == cls.VARIANTS[0]
    for variant, extra in cls.VARIANT_DEFAULTS.items():
        opt = cls(make_params(), lr=0.1, variant=variant)
        assert all(opt.param_groups[0][k] == v for k, v in extra.items())


@pytest.mark.parametrize("cls", [LARS, TVLARS, LAMB])
def test_state_dicts_without_a_variant_load_as_the_paper(cls):
    params = make_params()
    opt = cls(params, lr=0.1)
    set_grads(params, 0)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    for group in state["param_groups"]:
        group.pop("variant")
    fresh = cls(params, lr=0.1)
    fresh.load_state_dict(state)
    assert all(g["variant"] == cls.VARIANTS[0] for g in fresh.param_groups)
