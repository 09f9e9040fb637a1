"""The published variants (issue 10) against float64 references written from the issue's
equations: LARS nus / barlowtwins, TVLARS authors, LAMB nus / authors.

The references use Python floats for norms, ratios, clamps and the global clip factor, one tensor
at a time, and share no code with ``lars.optim``. Each case runs on both code paths, with an
excluded group (``layer_adaptation=False``, here with the same weight decay as the adapted group,
so that "excluded: d = g" is visible), a zero weight tensor, a zero gradient and a missing one.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_optim_reference import (
    ADAPTED,
    FOREACH_PATHS,
    STEPS,
    assert_matches,
    lamb_foreach,
    make_problem,
    norm,
    run_ours,
)

from lars.optim import LAMB, LARS, TVLARS

PATHS = FOREACH_PATHS  # fused (the default), foreach, loop
ADAPT = pytest.mark.parametrize("adapted", ADAPTED, ids=["all-adapted", "excluded-group"])


def scaled_problem(seed: int, grad_scale: float):
    weights, grads = make_problem(seed)
    return weights, [[g if g is None else g * grad_scale for g in row] for row in grads]


def ref_lars_nus(weights, grads, adapted, *, lr, momentum, wd, eta, eps, tc=50.0, uc=10.0):
    """LARS-ImageNet lars.py: adapted: trust = clamp(eta ||w|| / (||g|| + wd ||w|| + eps), 0, tc),
    d = g + wd w; excluded: trust = 1, d = g; d = clamp(d, -uc, uc); buf = d on the first step,
    else m buf + d; w -= lr trust buf. Also returns which clamps were reached."""
    w = [x.clone() for x in weights]
    buf: list[torch.Tensor | None] = [None] * len(w)
    trusts: list[float | None] = [None] * len(w)
    reached = {"trust": False, "update": False}
    for row in grads:
        for i, g in enumerate(row):
            if g is None:
                continue
            trust, d = 1.0, g
            if adapted[i]:
                d = g + wd * w[i]
                wn, gn = norm(w[i]), norm(g)
                if wn > 0 and gn > 0:
                    ratio = eta * wn / (gn + wd * wn + eps)
                    reached["trust"] |= ratio > tc
                    trust = min(max(ratio, 0.0), tc)
                trusts[i] = trust
            reached["update"] |= bool((d.abs() > uc).any())
            d = d.clamp(-uc, uc)
            if momentum == 0:
                step = d
            else:
                buf[i] = d.clone() if buf[i] is None else momentum * buf[i] + d
                step = buf[i]
            w[i] = w[i] - lr * trust * step
    return w, trusts, reached


def ref_lars_barlow(weights, grads, adapted, *, lr, momentum, wd, eta, phi=None, nc=None):
    """Barlow Twins LARS (phi and nc = 10: the TVLARS authors' tvlars.py): adapted: d = g + wd w,
    trust = eta [phi(t)] min(||w||, nc) / min(||d||, nc) (1 on a zero norm), d = trust d;
    excluded: d = g; mu = m mu + d (mu starts at 0); w -= lr mu."""
    w = [x.clone() for x in weights]
    mu = [torch.zeros_like(x) for x in weights]
    t = [0] * len(w)
    trusts: list[float | None] = [None] * len(w)
    for row in grads:
        for i, g in enumerate(row):
            if g is None:
                continue
            t[i] += 1
            d = g
            if adapted[i]:
                d = g + wd * w[i]
                wn, dn = norm(w[i]), norm(d)
                trust = 1.0
                if wn > 0 and dn > 0:
                    wc, dc = (min(wn, nc), min(dn, nc)) if nc is not None else (wn, dn)
                    trust = eta * (phi(t[i]) if phi else 1.0) * wc / dc
                trusts[i] = trust
                d = trust * d
            mu[i] = momentum * mu[i] + d
            w[i] = w[i] - lr * mu[i]
    return w, trusts


def ref_lamb_variant(weights, grads, adapted, *, lr, beta1, beta2, eps, wd, nus, nc=10.0, mgn=1.0):
    """LAMB without bias correction. nus (LARS-ImageNet lamb.py): all gradients of the step scaled
    by min(1, mgn / (N + 1e-6)), N their global norm; u = mo / (sqrt(ve) + eps), + wd w and trust
    = ||w|| / ||u|| only when wd != 0. authors (TVLARS repo lamb.py): u = mo / (sqrt(ve) + eps) +
    wd w, trust = min(||w||, nc) / ||u||. Trust 1 on a zero norm and in excluded groups."""
    w = [x.clone() for x in weights]
    mo = [torch.zeros_like(x) for x in weights]
    ve = [torch.zeros_like(x) for x in weights]
    trusts: list[float | None] = [None] * len(w)
    clipped = False
    for row in grads:
        coef = 1.0
        if nus:
            total = math.sqrt(sum(norm(g) ** 2 for g in row if g is not None))
            coef = min(1.0, mgn / (total + 1e-6))
            clipped |= coef < 1.0
        for i, g in enumerate(row):
            if g is None:
                continue
            g = g * coef
            mo[i] = beta1 * mo[i] + (1 - beta1) * g
            ve[i] = beta2 * ve[i] + (1 - beta2) * g * g
            u = mo[i] / (ve[i].sqrt() + eps)
            if wd != 0:
                u = u + wd * w[i]
            trust = 1.0
            if adapted[i] and (wd != 0 or not nus):
                wn, un = norm(w[i]), norm(u)
                if wn > 0 and un > 0:
                    trust = (wn if nus else min(wn, nc)) / un
            if adapted[i]:
                trusts[i] = trust
            w[i] = w[i] - lr * trust * u
    return w, trusts, clipped


NUS_CASES = [  # (grad scale, settings, clamps to reach)
    (1.0, dict(lr=0.5, momentum=0.9, wd=0.0, eta=0.02, eps=0.0), ()),
    (1.0, dict(lr=0.5, momentum=0.9, wd=0.1, eta=0.02, eps=1e-5), ()),
    (1.0, dict(lr=0.5, momentum=0.0, wd=0.1, eta=0.02, eps=0.0), ()),
    (0.01, dict(lr=0.01, momentum=0.9, wd=0.0, eta=1.0, eps=0.0), ("trust",)),  # ratio ~ 100
    (30.0, dict(lr=0.01, momentum=0.8, wd=0.1, eta=0.02, eps=0.0), ("update",)),  # |g| > 10
    (
        30.0,
        dict(lr=0.01, momentum=0.0, wd=0.0, eta=200.0, eps=0.0, tc=3.0, uc=0.5),
        ("trust", "update"),
    ),
]


@PATHS
@ADAPT
@pytest.mark.parametrize(
    "scale,case,clamps", NUS_CASES, ids=[str(i) for i in range(len(NUS_CASES))]
)
def test_lars_nus_matches_reference(scale, case, clamps, adapted, foreach):
    weights, grads = scaled_problem(10, scale)
    ref, ref_trust, reached = ref_lars_nus(weights, grads, adapted, **case)
    if all(adapted):  # the excluded pattern has fewer adapted tensors to reach the trust clamp
        assert all(reached[c] for c in clamps), reached
    kwargs = dict(lr=case["lr"], momentum=case["momentum"], weight_decay=case["wd"])
    kwargs.update(trust_coefficient=case["eta"], eps=case["eps"], variant="nus")
    if "tc" in case:
        kwargs.update(trust_clip=case["tc"], update_clip=case["uc"])
    ours, ours_trust, opt = run_ours(LARS, weights, grads, adapted, foreach, **kwargs)
    assert_matches(ours, ref, ours_trust, ref_trust, adapted)
    expected = (case.get("tc", 50.0), case.get("uc", 10.0))
    assert all((g["trust_clip"], g["update_clip"]) == expected for g in opt.param_groups)


BARLOW_CASES = [
    dict(lr=0.5, momentum=0.9, wd=0.0, eta=0.02),
    dict(lr=0.5, momentum=0.9, wd=0.1, eta=0.02),
    dict(lr=0.5, momentum=0.0, wd=0.1, eta=0.02),
    dict(lr=0.5, momentum=0.0, wd=0.0, eta=0.02),
]


@PATHS
@ADAPT
@pytest.mark.parametrize("case", BARLOW_CASES, ids=str)
def test_lars_barlowtwins_matches_reference(case, adapted, foreach):
    weights, grads = make_problem(11)
    ref, ref_trust = ref_lars_barlow(weights, grads, adapted, **case)
    kwargs = dict(lr=case["lr"], momentum=case["momentum"], weight_decay=case["wd"])
    kwargs.update(trust_coefficient=case["eta"], variant="barlowtwins")
    ours, ours_trust, _ = run_ours(LARS, weights, grads, adapted, foreach, **kwargs)
    assert_matches(ours, ref, ours_trust, ref_trust, adapted)


def authors_phi(lmbda: float):
    """TVLARS authors' opt/tvlars.py: 1 / (0.1 + exp(lmbda t)), t the 1-based step."""
    return lambda t: 1.0 / (0.1 + math.exp(lmbda * t))


TV_AUTHOR_CASES = [  # (weight scale, settings): scale 20 puts ||w|| and ||d|| past the clamp
    (1.0, dict(lr=0.5, momentum=0.9, wd=5e-4, eta=0.02, lmbda=0.3)),
    (1.0, dict(lr=0.5, momentum=0.0, wd=0.0, eta=0.02, lmbda=0.001)),
    (20.0, dict(lr=0.5, momentum=0.9, wd=0.1, eta=0.02, lmbda=0.1)),
]


@PATHS
@ADAPT
@pytest.mark.parametrize("wscale,case", TV_AUTHOR_CASES, ids=["wd", "no-momentum", "norm-clip"])
def test_tvlars_authors_matches_reference(wscale, case, adapted, foreach):
    case = dict(case)
    weights, grads = scaled_problem(12, wscale)
    weights = [x * wscale for x in weights]
    if wscale > 1:
        assert norm(weights[0]) > 10 and norm(grads[0][0] + case["wd"] * weights[0]) > 10
    lmbda = case.pop("lmbda")
    ref, ref_trust = ref_lars_barlow(
        weights, grads, adapted, phi=authors_phi(lmbda), nc=10.0, **case
    )
    kwargs = dict(lr=case["lr"], momentum=case["momentum"], weight_decay=case["wd"])
    kwargs.update(trust_coefficient=case["eta"], lmbda=lmbda, variant="authors")
    ours, ours_trust, opt = run_ours(TVLARS, weights, grads, adapted, foreach, **kwargs)
    assert_matches(ours, ref, ours_trust, ref_trust, adapted)
    assert float(opt.last_phi) == pytest.approx(authors_phi(lmbda)(STEPS), rel=1e-12)


LAMB_CASES = [  # (grad scale, settings): scale 3 makes the global norm exceed 1 (nus clips)
    (0.05, dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-6, wd=0.0)),
    (3.0, dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-6, wd=0.1)),
    (3.0, dict(lr=0.05, beta1=0.5, beta2=0.8, eps=1e-3, wd=0.01)),
]


@pytest.mark.parametrize("path", ["fused", "foreach", "foreach-unfused", "loop"])
@ADAPT
@pytest.mark.parametrize("variant", ["nus", "authors"])
@pytest.mark.parametrize("scale,case", LAMB_CASES, ids=["small-g", "clipped-wd", "betas"])
def test_lamb_variants_match_reference(scale, case, variant, adapted, path):
    foreach, fused = lamb_foreach(path), path != "foreach-unfused"
    weights, grads = scaled_problem(13, scale)
    if variant == "authors" and scale > 1:
        weights = [x * 8 for x in weights]  # ||w|| past the clamp at 10
        assert norm(weights[0]) > 10
    nus = variant == "nus"
    ref, ref_trust, clipped = ref_lamb_variant(weights, grads, adapted, nus=nus, **case)
    assert clipped == (nus and scale > 1)
    kwargs = dict(lr=case["lr"], betas=(case["beta1"], case["beta2"]), eps=case["eps"])
    kwargs.update(weight_decay=case["wd"], variant=variant, fused=fused)
    ours, ours_trust, _ = run_ours(LAMB, weights, grads, adapted, foreach, **kwargs)
    assert_matches(ours, ref, ours_trust, ref_trust, adapted)
