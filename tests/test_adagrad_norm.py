"""AdaGrad-Norm (Ward, Wu & Bottou 2019) against a float64 reference written from the equations:
b_t^2 = b0^2 + sum_{s<=t} ||g_s + wd w_s||^2 over the whole model, w -= lr / b_t (g + wd w)."""

from __future__ import annotations

import math

import pytest
import torch

from lars.optim import AdaGradNorm


def reference(weights, grads_per_step, groups):
    """Plain Python floats: weights[i] lists of floats, groups[i] = (lr, b0, wd)."""
    w = [list(x) for x in weights]
    total = 0.0
    for grads in grads_per_step:
        d = [
            None if g is None else [gj + groups[i][2] * wj for gj, wj in zip(g, w[i])]
            for i, g in enumerate(grads)
        ]
        total += sum(x * x for di in d if di is not None for x in di)
        for i, di in enumerate(d):
            if di is None:
                continue
            lr, b0, _ = groups[i]
            step = lr / math.sqrt(b0 * b0 + total)
            w[i] = [wj - step * x for wj, x in zip(w[i], di)]
    return w


def make(foreach, groups, shapes):
    torch.manual_seed(0)
    params = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    opt = AdaGradNorm(
        [
            dict(params=[p], lr=lr, b0=b0, weight_decay=wd)
            for p, (lr, b0, wd) in zip(params, groups)
        ],
        foreach=foreach,
    )
    return params, opt


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_the_float64_reference(foreach):
    groups, shapes = [(0.5, 0.1, 0.0), (0.2, 2.0, 0.01), (1.0, 0.3, 0.0)], [(3, 2), (4,), (2,)]
    params, opt = make(foreach, groups, shapes)
    start = [p.detach().flatten().tolist() for p in params]
    torch.manual_seed(1)
    steps = []
    for t in range(5):
        grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
        if t == 2:
            grads[2] = None  # a parameter without a gradient this step keeps its history
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        steps.append([None if g is None else g.flatten().tolist() for g in grads])
    expected = reference(start, steps, groups)
    for p, e in zip(params, expected):
        assert p.detach().flatten().tolist() == pytest.approx(e, rel=1e-13, abs=1e-15)


def test_foreach_equals_the_loop_and_state_round_trips():
    groups, shapes = [(0.5, 0.1, 0.0), (0.2, 2.0, 0.01)], [(3, 2), (4,)]
    runs = [make(f, groups, shapes) for f in (False, True)]
    torch.manual_seed(2)
    grads = [[torch.randn(s, dtype=torch.float64) for s in shapes] for _ in range(6)]
    for t, gs in enumerate(grads):
        if t == 3:  # rebuild the foreach run from its state dict, as Horovod's Cls(param_groups)
            params, opt = runs[1]
            saved = opt.state_dict()
            fresh = AdaGradNorm([dict(g, params=[p]) for g, p in zip(opt.param_groups, params)])
            fresh.load_state_dict(saved)
            runs[1] = (params, fresh)
        for params, opt in runs:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    state = runs[1][1].state[runs[1][0][0]]
    assert float(state["step"]) == 6 and state["sum_sq"] > 0


def test_arguments_are_checked():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="b0"):
        AdaGradNorm([p], lr=0.1, b0=0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        AdaGradNorm([p], lr=0.1, weight_decay=-1.0)
    with pytest.raises(ValueError, match="lr"):
        AdaGradNorm([{"params": [p]}])
    AdaGradNorm([{"params": [p], "lr": 0.1}])  # lr from the group, as Cls(param_groups)
