"""The fused CPU step (lars.optim._fused, issue 15): when it is taken, what happens where it cannot
be built, checkpoints that move between it and the eager path, and tensors larger than one of its
work chunks, against the float64 references of ``test_optim_reference``.

The equations themselves are checked on this path by every test parametrised over ``fused`` in
test_optim_reference, test_optim_variants, test_optim_behaviour and test_optim_paths.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from test_optim_reference import DT, reference_lamb, reference_lars

from lars.optim import LAMB, LARS, TVLARS, _fused, _lamb_rules, _lars_rules

NO_FUSED = _fused.unavailable_reason()
needs_fused = pytest.mark.skipif(NO_FUSED is not None, reason=f"fused CPU kernel: {NO_FUSED}")
SETTINGS = [
    (LARS, dict(lr=0.5, weight_decay=0.1, trust_coefficient=0.02)),
    (LARS, dict(lr=0.5, weight_decay=0.1, variant="nus", update_clip=0.05)),
    (LARS, dict(lr=0.5, weight_decay=0.1, variant="barlowtwins")),
    (TVLARS, dict(lr=0.5, weight_decay=0.1, lmbda=0.3, delay_steps=1, min_scale=0.05)),
    (TVLARS, dict(lr=0.5, weight_decay=0.1, lmbda=0.3, variant="authors")),
    (LAMB, dict(lr=0.05, weight_decay=0.1)),
    (LAMB, dict(lr=0.05, weight_decay=0.1, variant="nus")),
    (LAMB, dict(lr=0.05, weight_decay=0.1, variant="authors")),
]
OPTS = pytest.mark.parametrize(
    "cls,kwargs", SETTINGS, ids=[f"{c.__name__}-{k.get('variant', 'paper')}" for c, k in SETTINGS]
)


# launch/setup.sh leaves this file in a venv where the kernel built: there it must load.
FUSED_EXPECTED = Path(sys.prefix, ".lars-with-fused").exists()


def test_fused_kernel_builds():
    """Skips where the extension cannot be built here (the reason is the skip message), unless
    launch/setup.sh built it in this venv or ``LARS_REQUIRE_FUSED=1`` is set: then it fails."""
    script = (Path(__file__).resolve().parents[1] / "launch" / "setup.sh").read_text()
    assert ".lars-with-fused" in script and "unavailable_reason" in script
    if NO_FUSED is not None:
        if FUSED_EXPECTED or os.environ.get("LARS_REQUIRE_FUSED") == "1":
            pytest.fail(f"the fused CPU kernel was expected here but is unavailable: {NO_FUSED}")
        pytest.skip(f"fused CPU kernel: {NO_FUSED}")
    module = _fused.load()
    assert hasattr(module, "lars_step") and hasattr(module, "lamb_step")


def problem(shapes, steps=4, dtype=DT, seed=11):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(steps)]
    return weights, grads


def run(cls, weights, grads, opt=None, **kwargs):
    params = [w.clone().requires_grad_() for w in weights]
    opt = cls(params, **kwargs)
    for row in grads:
        for p, g in zip(params, row):
            p.grad = g.clone()
        opt.step()
    return params, opt


def count_kernel_calls(monkeypatch) -> list[int]:
    """Counts the buckets handed to the fused kernels (by wrapping the two call sites)."""
    calls = [0]
    lars_step, lamb_step = _lars_rules._fused_step, _lamb_rules._kernel_step

    def lars_counted(*args, **kwargs):
        calls[0] += 1
        return lars_step(*args, **kwargs)

    def lamb_counted(*args, **kwargs):
        calls[0] += 1
        return lamb_step(*args, **kwargs)

    monkeypatch.setattr(_lars_rules, "_fused_step", lars_counted)
    monkeypatch.setattr(_lamb_rules, "_kernel_step", lamb_counted)
    return calls


@needs_fused
@pytest.mark.parametrize("cls", [LARS, TVLARS, LAMB])
@pytest.mark.parametrize(
    "options,taken",
    [
        (dict(), True),  # the default: fused=None with foreach=None
        (dict(fused=True), True),
        (dict(fused=True, foreach=True), True),
        (dict(foreach=True), False),  # asking for foreach gets foreach
        (dict(fused=False), False),
        (dict(foreach=False, fused=True), False),  # foreach=False is always the loop
    ],
    ids=str,
)
def test_when_the_fused_kernel_is_taken(cls, options, taken, monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    weights, grads = problem([(5, 3), (4,)], steps=1)
    run(cls, weights, grads, lr=0.1, **options)
    assert calls[0] == (1 if taken else 0)


@needs_fused
def test_tensors_it_cannot_take_go_to_the_eager_path(monkeypatch):
    """float32 channels_last weights with channels_last gradients go in; bfloat16 and a
    contiguous gradient of a channels_last weight stay eager, in buckets of their own."""
    calls = count_kernel_calls(monkeypatch)
    conv = torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last).requires_grad_()
    odd = torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last).requires_grad_()
    low = torch.randn(6, dtype=torch.bfloat16).requires_grad_()
    opt = LARS([conv, odd, low], lr=0.1)
    conv.grad = torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last)
    odd.grad, low.grad = torch.randn(4, 3, 2, 2), torch.randn(6, dtype=torch.bfloat16)
    opt.step()
    assert calls[0] == 1
    assert _fused.fusable([[conv, odd, low], [conv.grad, odd.grad, low.grad]], None) == [
        True,
        False,
        False,
    ]


@OPTS
def test_tensors_over_many_work_chunks_match_the_reference(cls, kwargs):
    """The kernel cuts tensors into chunks of 16384 values and sums their norms chunk by chunk:
    tensors of several chunks, with a partial last one, against the float64 references. The
    references cover the paper forms; the variants are compared with the eager path."""
    if NO_FUSED is not None:
        pytest.skip(f"fused CPU kernel: {NO_FUSED}")
    weights, grads = problem([(300, 200), (16385,), (7,)], steps=3)
    ours, _ = run(cls, weights, grads, **kwargs)
    variant = kwargs.get("variant")
    if variant is None and cls is LAMB:
        expected = reference_lamb(weights, grads, [True] * 3, lr=0.05, beta1=0.9, beta2=0.999,
                                  eps=1e-6, wd=0.1)[0]  # fmt: skip
    elif variant is None:
        tv = (0.3, 1.0, 1, 0.05) if cls is TVLARS else None
        expected = reference_lars(weights, grads, [True] * 3, lr=0.5, momentum=0.9, wd=0.1,
                                  eta=0.02 if cls is LARS else 1e-3, eps=0.0, nesterov=False,
                                  tv=tv)[0]  # fmt: skip
    else:
        expected = [p.detach() for p in run(cls, weights, grads, foreach=True, **kwargs)[0]]
    for i, (a, b) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-13, msg=f"tensor {i}")


@needs_fused
@OPTS
@pytest.mark.parametrize("order", ["fused-then-eager", "eager-then-fused"])
def test_checkpoints_move_between_the_fused_and_eager_paths(cls, kwargs, order):
    """3 steps on one path, state_dict, 3 steps on the other: the same as 6 steps on either, and
    the state dicts hold the same keys, shapes and dtypes."""
    weights, grads = problem([(6, 5), (5,), (3, 2, 2)], steps=6)
    paths = [dict(fused=True), dict(foreach=True)]
    first, second = paths if order == "fused-then-eager" else paths[::-1]
    straight, straight_opt = run(cls, weights, grads, **kwargs, **second)
    half, opt = run(cls, weights, grads[:3], **kwargs, **first)
    saved = copy.deepcopy(opt.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in half]
    opt = cls(resumed, **kwargs, **first)
    opt.load_state_dict(saved)
    for group in opt.param_groups:  # the checkpoint's path options, switched as a user would
        group.update(foreach=second.get("foreach"), fused=second.get("fused"))
    for row in grads[3:]:
        for p, g in zip(resumed, row):
            p.grad = g.clone()
        opt.step()
    for a, b in zip(resumed, straight):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    mine, theirs = opt.state_dict()["state"], straight_opt.state_dict()["state"]
    assert mine.keys() == theirs.keys()
    for index, state in mine.items():
        assert state.keys() == theirs[index].keys()
        for key, value in state.items():
            assert (value.shape, value.dtype) == (
                theirs[index][key].shape,
                theirs[index][key].dtype,
            )


@needs_fused
@pytest.mark.parametrize("cls", [LARS, LAMB])
def test_result_does_not_depend_on_the_thread_count(cls):
    """Chunk sums are added in a fixed order: 1 and 2 threads give bitwise the same weights."""
    weights, grads = problem([(300, 200), (40000,), (9,)], steps=2, dtype=torch.float32)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run(cls, weights, grads, lr=0.05, weight_decay=0.1)[0])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.fixture
def fresh_loader(monkeypatch):
    """The loader as in a new process (nothing loaded, no failure recorded yet)."""
    monkeypatch.setattr(_fused, "_module", None)
    monkeypatch.setattr(_fused, "_reason", None)


def eager_equals_fallback(cls, kwargs):
    weights, grads = problem([(6, 5), (5,)], steps=3)
    fallback, _ = run(cls, weights, grads, **kwargs)  # the default path, without the kernel
    eager, _ = run(cls, weights, grads, foreach=True, **kwargs)
    for a, b in zip(fallback, eager):
        assert torch.equal(a, b)


def test_switched_off_by_environment(fresh_loader, monkeypatch, caplog):
    monkeypatch.setenv("LARS_FUSED_CPU", "0")
    with caplog.at_level(logging.WARNING, logger="lars.optim._fused"):
        eager_equals_fallback(LARS, dict(lr=0.1, weight_decay=0.1))
        eager_equals_fallback(LAMB, dict(lr=0.01, weight_decay=0.1))
    assert _fused.unavailable_reason() == "LARS_FUSED_CPU=0 is set"
    warnings = [r for r in caplog.records if "fused CPU step unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "LARS_FUSED_CPU=0" in warnings[0].getMessage()


def test_no_compiler_falls_back_with_the_reason(fresh_loader, monkeypatch, tmp_path, caplog):
    """A machine without a working C++ compiler (CXX pointing nowhere, an empty build folder):
    the build fails, one warning names the compiler error, and the step runs on foreach."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    name, flags = _fused._flags()
    monkeypatch.setattr(_fused, "_flags", lambda: (name + "_nocompiler", flags))
    with caplog.at_level(logging.WARNING, logger="lars.optim._fused"):
        eager_equals_fallback(TVLARS, dict(lr=0.1, weight_decay=0.1, lmbda=0.1))
    reason = _fused.unavailable_reason()
    assert reason is not None and reason.startswith("building it failed")
    assert "no-such-c++" in reason or "not found" in reason, reason
    assert sum("fused CPU step unavailable" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("variant", LAMB.VARIANTS)
@pytest.mark.parametrize("path", ["fused", "foreach", "loop"])
def test_lamb_float32_moments_carry_no_rounded_one_minus_beta(variant, path):
    """After one step from zero state, mo = (1 - b1) g and ve = (1 - b2) g^2 to float32
    rounding. (1 - b2) taken in float32 after rounding b2 = 0.999 is 5e-5 off, a bias in every
    step that a float32 run would carry and the float64 tests cannot see."""
    if path == "fused" and NO_FUSED is not None:
        pytest.skip(f"fused CPU kernel: {NO_FUSED}")
    options = {
        "fused": dict(fused=True),
        "foreach": dict(foreach=True),
        "loop": dict(foreach=False),
    }
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(50, generator=gen).requires_grad_()
    w.grad = torch.rand(50, generator=gen) * 1e-2 + 1e-3  # no clipping by nus's global norm
    opt = LAMB([w], lr=0.1, variant=variant, **options[path])
    opt.step()
    g = w.grad.to(DT)
    state = opt.state[w]
    torch.testing.assert_close(state["exp_avg"].to(DT), 0.1 * g, rtol=3e-7, atol=0.0)
    torch.testing.assert_close(state["exp_avg_sq"].to(DT), 0.001 * g * g, rtol=3e-7, atol=0.0)


def test_tensors_off_the_cpu_never_build_the_kernel(fresh_loader, monkeypatch):
    """A GPU run's parameters are not CPU tensors: asking whether they are fusable must not
    start a (30 s, compiler-needing) build on every rank."""
    monkeypatch.setattr(_fused, "load", lambda: pytest.fail("the kernel was loaded"))
    params = [torch.empty(3, 2, device="meta"), torch.empty(2, device="meta")]
    assert _fused.fusable([params, params], None) == [False, False]


def test_the_venvs_ninja_is_found_without_activation(monkeypatch, tmp_path):
    """torch runs `ninja` from PATH; the venv's python called by its full path (no `activate`)
    must still find the ninja that launch/setup.sh installed beside it."""
    (tmp_path / "ninja").write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", "/nonexistent")
    _fused._find_venv_ninja()
    assert os.environ["PATH"].split(os.pathsep)[0] == str(tmp_path)
