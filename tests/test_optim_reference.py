"""LARS, TVLARS and LAMB against float64 references written straight from the papers' equations.

The references below are deliberately naive (Python floats for the norms and trust ratios, one
tensor at a time) and share no code with ``lars.optim``. The fused CPU kernel (the default,
``foreach=None``), the multi-tensor path (``foreach=True``) and the per-tensor loop
(``foreach=False``) are all checked against them.
"""

from __future__ import annotations

import math

import pytest
import torch

from lars.optim import LAMB, LARS, TVLARS, _fused

DT = torch.float64
# The default path (foreach=None, fused=None) is the fused CPU kernel where it builds; without a
# compiler those cases skip (test_optim_fused.test_fused_kernel_builds says why).
_NO_FUSED = _fused.unavailable_reason()
FUSED = pytest.param(
    None,
    id="fused",
    marks=pytest.mark.skipif(_NO_FUSED is not None, reason=f"fused CPU kernel: {_NO_FUSED}"),
)
FOREACH = pytest.param(True, id="foreach")
FOREACH_PATHS = pytest.mark.parametrize("foreach", [FUSED, FOREACH, pytest.param(False, id="loop")])
SHAPES = [(4, 3), (5,), (2, 3, 2), (3,)]
STEPS = 6


def make_problem(seed: int = 0) -> tuple[list[torch.Tensor], list[list[torch.Tensor | None]]]:
    """Initial weights and a gradient per step and tensor, with the awkward cases built in:
    tensor 3 starts at zero, tensor 1 gets a zero gradient on step 2 and none on step 4."""
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]
    weights[3].zero_()
    grads: list[list[torch.Tensor | None]] = []
    for step in range(1, STEPS + 1):
        row: list[torch.Tensor | None] = [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]
        if step == 2:
            row[1] = torch.zeros(SHAPES[1], dtype=DT)
        if step == 4:
            row[1] = None
        grads.append(row)
    return weights, grads


def norm(x: torch.Tensor) -> float:
    return math.sqrt(float((x * x).sum()))


def phi_tv(t: int, lmbda: float, alpha: float, delay: float, min_scale: float) -> float:
    """TVLARS paper, eq. 4-5: phi(t) = 1 / (alpha + exp(lambda (t - d_e))) + gamma_min."""
    return 1.0 / (alpha + math.exp(lmbda * (t - delay))) + min_scale


def reference_lars(weights, grads, adapted, *, lr, momentum, wd, eta, eps, nesterov, tv=None):
    """You, Gitman & Ginsburg 2017, Algorithm 1; ``tv`` = (lmbda, alpha, delay, min_scale) turns
    it into TVLARS. Returns final weights and the trust ratio applied last to each tensor."""
    w = [x.clone() for x in weights]
    v = [torch.zeros_like(x) for x in weights]
    t = [0] * len(w)
    trusts: list[float | None] = [None] * len(w)
    for row in grads:
        for i, g in enumerate(row):
            if g is None:
                continue
            t[i] += 1
            d = g + wd * w[i]
            trust = 1.0
            if adapted[i]:
                wn, gn = norm(w[i]), norm(g)
                if wn > 0 and gn > 0:
                    trust = eta * wn / (gn + wd * wn + eps)
                if tv is not None:
                    trust *= phi_tv(t[i], *tv)
                trusts[i] = trust
            v[i] = momentum * v[i] + lr * trust * d
            if nesterov:
                w[i] = w[i] - (momentum * v[i] + lr * trust * d)
            else:
                w[i] = w[i] - v[i]
    return w, trusts


def reference_lamb(weights, grads, adapted, *, lr, beta1, beta2, eps, wd):
    """You et al. 2020, Algorithm 2 (LAMB) with Adam's bias correction."""
    w = [x.clone() for x in weights]
    mo = [torch.zeros_like(x) for x in weights]
    ve = [torch.zeros_like(x) for x in weights]
    t = [0] * len(w)
    trusts: list[float | None] = [None] * len(w)
    for row in grads:
        for i, g in enumerate(row):
            if g is None:
                continue
            t[i] += 1
            mo[i] = beta1 * mo[i] + (1 - beta1) * g
            ve[i] = beta2 * ve[i] + (1 - beta2) * g * g
            m_hat = mo[i] / (1 - beta1 ** t[i])
            v_hat = ve[i] / (1 - beta2 ** t[i])
            r = m_hat / (v_hat.sqrt() + eps) + wd * w[i]
            trust = 1.0
            if adapted[i]:
                wn, rn = norm(w[i]), norm(r)
                if wn > 0 and rn > 0:
                    trust = wn / rn
                trusts[i] = trust
            w[i] = w[i] - lr * trust * r
    return w, trusts


def run_ours(cls, weights, grads, adapted, foreach, **kwargs):
    """Run our optimizer; tensors with adapted[i] False go into a layer_adaptation=False group."""
    params = [x.clone().requires_grad_() for x in weights]
    groups = [
        {"params": [p for p, a in zip(params, adapted) if a]},
        {"params": [p for p, a in zip(params, adapted) if not a], "layer_adaptation": False},
    ]
    opt = cls([g for g in groups if g["params"]], foreach=foreach, **kwargs)
    for row in grads:
        for p, g in zip(params, row):
            p.grad = None if g is None else g.clone()
        opt.step()
    ratios = {id(p): r for p, r in opt.last_trust_ratios()}
    return [p.detach() for p in params], [ratios.get(id(p)) for p in params], opt


def lamb_foreach(path: str) -> bool | None:
    """``foreach`` for a LAMB test path; "fused" is the default (None), skipped without it."""
    if path == "fused" and _NO_FUSED is not None:
        pytest.skip(f"fused CPU kernel: {_NO_FUSED}")
    return {"fused": None, "loop": False}.get(path, True)


def assert_matches(ours, ref, ours_trust, ref_trust, adapted):
    for i, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13, msg=f"tensor {i}")
    for i, (a, b) in enumerate(zip(ours_trust, ref_trust)):
        if adapted[i]:
            assert a is not None and a.dim() == 0, f"tensor {i}: no trust ratio reported"
            assert float(a) == pytest.approx(b, rel=1e-12), f"tensor {i}: trust ratio"
        else:
            assert a is None, f"tensor {i}: excluded tensor reported a trust ratio"


ADAPTED = [
    [True, True, True, True],
    [True, False, True, False],  # biases and norms in a layer_adaptation=False group
]

LARS_CASES = [
    dict(lr=0.5, momentum=0.9, wd=0.0, eta=0.02, eps=0.0, nesterov=False),
    dict(lr=0.5, momentum=0.9, wd=0.1, eta=0.02, eps=0.0, nesterov=False),
    dict(lr=0.5, momentum=0.0, wd=0.1, eta=0.02, eps=0.0, nesterov=False),
    dict(lr=0.5, momentum=0.0, wd=0.0, eta=0.02, eps=1e-3, nesterov=False),
    dict(lr=0.5, momentum=0.8, wd=0.1, eta=0.02, eps=1e-3, nesterov=True),
    dict(lr=0.5, momentum=0.5, wd=0.0, eta=0.02, eps=0.0, nesterov=True),
]


def lars_kwargs(case):
    return dict(
        lr=case["lr"],
        momentum=case["momentum"],
        weight_decay=case["wd"],
        trust_coefficient=case["eta"],
        eps=case["eps"],
        nesterov=case["nesterov"],
    )


@FOREACH_PATHS
@pytest.mark.parametrize("adapted", ADAPTED, ids=["all-adapted", "excluded-group"])
@pytest.mark.parametrize(
    "case", LARS_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items())
)
def test_lars_matches_reference(case, adapted, foreach):
    weights, grads = make_problem()
    ref, ref_trust = reference_lars(weights, grads, adapted, **case)
    ours, ours_trust, _ = run_ours(LARS, weights, grads, adapted, foreach, **lars_kwargs(case))
    assert_matches(ours, ref, ours_trust, ref_trust, adapted)


TV_CASES = [
    (0.5, 1.0, 0, 0.0),  # DESIGN defaults for alpha, delay_steps, min_scale
    (0.3, 0.1, 0, 0.0),  # the authors' released alpha
    (0.7, 1.0, 3, 0.05),  # delay and floor
    (1.0, 2.0, 2, 0.5),
    (0.0, 1.0, 0, 0.0),  # lmbda = 0: constant phi = 1 / (alpha + 1)
]


@FOREACH_PATHS
@pytest.mark.parametrize("adapted", ADAPTED, ids=["all-adapted", "excluded-group"])
@pytest.mark.parametrize("tv", TV_CASES, ids=lambda c: "l{}-a{}-d{}-m{}".format(*c))
@pytest.mark.parametrize("case", [LARS_CASES[1], LARS_CASES[2], LARS_CASES[4]], ids=str)
def test_tvlars_matches_reference(case, tv, adapted, foreach):
    weights, grads = make_problem(1)
    ref, ref_trust = reference_lars(weights, grads, adapted, tv=tv, **case)
    lmbda, alpha, delay, min_scale = tv
    ours, ours_trust, opt = run_ours(
        TVLARS,
        weights,
        grads,
        adapted,
        foreach,
        lmbda=lmbda,
        alpha=alpha,
        delay_steps=delay,
        min_scale=min_scale,
        **lars_kwargs(case),
    )
    assert_matches(ours, ref, ours_trust, ref_trust, adapted)
    # Tensor 0 has a gradient at every step: its phi is the one reported, at t = STEPS.
    assert float(opt.last_phi) == pytest.approx(phi_tv(STEPS, *tv), rel=1e-12)


LAMB_CASES = [
    dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-6, wd=0.0),
    dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-6, wd=0.1),
    dict(lr=0.05, beta1=0.5, beta2=0.8, eps=1e-3, wd=0.01),  # bias correction far from 1
    dict(lr=0.05, beta1=0.0, beta2=0.0, eps=0.0, wd=0.0),  # no averaging, no eps
]


@pytest.mark.parametrize("path", ["fused", "foreach", "foreach-unfused", "loop"])
@pytest.mark.parametrize("adapted", ADAPTED, ids=["all-adapted", "excluded-group"])
@pytest.mark.parametrize(
    "case", LAMB_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items())
)
def test_lamb_matches_reference(case, adapted, path):
    foreach = lamb_foreach(path)
    weights, grads = make_problem(2)
    if case["eps"] == 0.0:  # 0 / 0 is undefined in the paper: keep every gradient non-zero
        grads = [[g if g is None else g + 0.5 for g in row] for row in grads]
    ref, ref_trust = reference_lamb(weights, grads, adapted, **case)
    ours, ours_trust, _ = run_ours(
        LAMB,
        weights,
        grads,
        adapted,
        foreach,
        lr=case["lr"],
        betas=(case["beta1"], case["beta2"]),
        eps=case["eps"],
        weight_decay=case["wd"],
        fused=path != "foreach-unfused",  # as on a device (or torch) without a fused kernel
    )
    assert_matches(ours, ref, ours_trust, ref_trust, adapted)


OPTIMIZERS = [
    (LARS, dict(lr=0.3, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.01)),
    (LARS, dict(lr=0.3, momentum=0.9, weight_decay=1e-2, nesterov=True, eps=1e-4)),
    (TVLARS, dict(lr=0.3, weight_decay=1e-2, lmbda=0.2, alpha=0.5, delay_steps=2, min_scale=0.1)),
    (LAMB, dict(lr=0.01, weight_decay=1e-2)),
    (LARS, dict(lr=0.3, weight_decay=1e-2, trust_coefficient=0.5, variant="nus", update_clip=1.0)),
    (LARS, dict(lr=0.3, weight_decay=1e-2, trust_coefficient=0.01, variant="barlowtwins")),
    (TVLARS, dict(lr=0.3, weight_decay=1e-2, lmbda=0.2, variant="authors")),
    (LAMB, dict(lr=0.01, weight_decay=1e-2, variant="nus")),
    (LAMB, dict(lr=0.01, weight_decay=1e-2, variant="authors")),
]


@pytest.mark.parametrize("foreach", [FUSED, FOREACH])
@pytest.mark.parametrize(
    "cls,kwargs", OPTIMIZERS, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(OPTIMIZERS)]
)
def test_foreach_equals_loop_float32(cls, kwargs, foreach):
    """The fused and multi-tensor paths on float32 tensors of mixed sizes: equal to the loop up
    to float32 rounding."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(64, 32), (64,), (16, 8, 3, 3), (10,), (1000,)]
    weights = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(5)]
    adapted = [True, False, True, False, True]
    a, ta, _ = run_ours(cls, weights, grads, adapted, foreach, **kwargs)
    b, tb, _ = run_ours(cls, weights, grads, adapted, False, **kwargs)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for x, y in zip(ta, tb):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=0.0)
