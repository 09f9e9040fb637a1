"""Optimizer paths that are always right (issue 9, findings 9-11): odd strides, torch.compile,
complex parameters, and bfloat16/float16 parameters, all against the float64 references of
``test_optim_reference`` (written from the papers' equations, sharing no code with lars.optim)."""

from __future__ import annotations

import pytest
import torch
from test_optim_reference import (
    FOREACH_PATHS,
    SHAPES,
    make_problem,
    norm,
    reference_lamb,
    reference_lars,
)

from lars.optim import LAMB, LARS, TVLARS

DT = torch.float64
LARS_REF = dict(lr=0.5, momentum=0.9, wd=0.1, eta=0.02, eps=0.0, nesterov=False)
LARS_KW = dict(lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.02)
TV = (0.3, 0.5, 1, 0.05)  # lmbda, alpha, delay_steps, min_scale
TV_KW = dict(LARS_KW, lmbda=0.3, alpha=0.5, delay_steps=1, min_scale=0.05)
LAMB_REF = dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-6, wd=0.1)
LAMB_KW = dict(lr=0.05, weight_decay=0.1)


def reference(cls, weights, grads):
    adapted = [True] * len(weights)
    if cls is LAMB:
        return reference_lamb(weights, grads, adapted, **LAMB_REF)[0]
    return reference_lars(weights, grads, adapted, tv=TV if cls is TVLARS else None, **LARS_REF)[0]


KWARGS = {LARS: LARS_KW, TVLARS: TV_KW, LAMB: LAMB_KW}
CLASSES = pytest.mark.parametrize("cls", [LARS, TVLARS, LAMB], ids=lambda c: c.__name__)
PATHS = FOREACH_PATHS  # fused (the default), foreach, loop


def odd_stride_problem(steps: int = 3):
    """A channels_last conv weight, a transposed matrix and a plain vector, with gradients that
    are contiguous (what Horovod's contiguous-copy compressor hands back for NHWC weights)."""
    gen = torch.Generator().manual_seed(7)
    weights = [
        torch.randn(8, 4, 3, 3, generator=gen, dtype=DT),
        torch.randn(6, 5, generator=gen, dtype=DT),
        torch.randn(7, generator=gen, dtype=DT),
    ]
    grads = [[torch.randn(w.shape, generator=gen, dtype=DT) for w in weights] for _ in range(steps)]
    return weights, grads


def as_odd_params(weights):
    conv = weights[0].clone().to(memory_format=torch.channels_last)
    transposed = weights[1].t().contiguous().t()  # same values, strides (1, 6)
    return [t.requires_grad_() for t in (conv, transposed, weights[2].clone())]


@CLASSES
@PATHS
def test_gradients_with_other_strides_than_their_parameters(cls, foreach):
    weights, grads = odd_stride_problem()
    params = as_odd_params(weights)
    assert params[0].stride() != weights[0].stride() and params[1].stride() == (1, 6)
    opt = cls(params, foreach=foreach, **KWARGS[cls])
    for row in grads:
        for p, g in zip(params, row):
            p.grad = g.clone()
            p.grad.set_(p.grad.contiguous())
        assert params[0].grad.stride() != params[0].stride()
        opt.step()
    for i, (ours, ref) in enumerate(zip(params, reference(cls, weights, grads))):
        torch.testing.assert_close(ours.detach(), ref, rtol=1e-12, atol=1e-13, msg=f"tensor {i}")


@CLASSES
def test_channels_last_state_loaded_contiguous(cls):
    """State tensors with other strides than the parameter (e.g. restored from a checkpoint
    written by a contiguous model) must not reach the fused kernel either."""
    weights, grads = odd_stride_problem(4)
    params = as_odd_params(weights)
    opt = cls(params, **KWARGS[cls])
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    opt.step()
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                state[key] = value.contiguous()
    for row in grads[1:]:
        for p, g in zip(params, row):
            p.grad = g.clone()
        opt.step()
    for ours, ref in zip(params, reference(cls, weights, grads)):
        torch.testing.assert_close(ours.detach(), ref, rtol=1e-12, atol=1e-13)


def run(cls, params, grads, step_fn=None, **kwargs):
    opt = cls(params, **{**KWARGS[cls], **kwargs})
    step = step_fn(opt.step) if step_fn else opt.step
    for row in grads:
        for p, g in zip(params, row):
            p.grad = None if g is None else g.clone()
        step()
    return opt


@pytest.mark.slow
@CLASSES
def test_compiled_step_matches_reference(cls):
    """torch.compile(optimizer.step) on the default multi-tensor path (issue 9, finding 10)."""
    torch._dynamo.reset()
    weights, grads = make_problem(4)
    grads = [
        [g if g is not None else torch.zeros_like(w) for g, w in zip(r, weights)] for r in grads
    ]
    grads = grads[:3]
    params = [w.clone().requires_grad_() for w in weights]
    opt = run(cls, params, grads, step_fn=torch.compile)
    for ours, ref in zip(params, reference(cls, weights, grads)):
        torch.testing.assert_close(ours.detach(), ref, rtol=1e-10, atol=1e-12)
    assert len(opt.last_trust_ratios()) == len(params)  # the step's log survives compilation
    if cls is TVLARS:
        assert opt.last_phi is not None


@CLASSES
@PATHS
def test_complex_parameters_update_as_real_pairs(cls, foreach):
    """As torch.optim: a complex tensor is updated as its real view (re, im pairs), so its norm
    is the complex norm and LAMB's second moment holds re^2 and im^2 (not the complex g * g)."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(4, 3), (5,)]
    weights = [torch.randn(s, generator=gen, dtype=torch.complex128) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.complex128) for s in shapes]] * 2
    grads += [[torch.randn(s, generator=gen, dtype=torch.complex128) for s in shapes]]
    params = [w.clone().requires_grad_() for w in weights]
    opt = run(cls, params, grads, foreach=foreach)
    real_w = [torch.view_as_real(w).clone() for w in weights]
    real_g = [[torch.view_as_real(g) for g in row] for row in grads]
    expected = reference(cls, real_w, real_g)
    for ours, ref in zip(params, expected):
        assert ours.is_complex()
        torch.testing.assert_close(torch.view_as_real(ours.detach()), ref, rtol=1e-12, atol=1e-13)
    ratios = opt.last_trust_ratios()
    assert [id(p) for p, _ in ratios] == [id(p) for p in params]  # the complex params themselves
    assert torch.linalg.vector_norm(params[0]).item() == pytest.approx(norm(expected[0]))


# Low precision: the float64 reference runs from the same rounded start and gradients; the
# tolerance is a few units of the dtype's rounding per step (bf16: 2^-8, fp16: 2^-11).
LOW = pytest.mark.parametrize(
    "dtype,tol", [(torch.bfloat16, 1.5e-2), (torch.float16, 2e-3)], ids=["bf16", "fp16"]
)


@CLASSES
@PATHS
@LOW
def test_low_precision_parameters_track_the_reference(cls, foreach, dtype, tol):
    weights, grads = make_problem(6)
    weights = [w.to(dtype) for w in weights]
    grads = [[g if g is None else g.to(dtype) for g in row] for row in grads[:4]]
    params = [w.clone().requires_grad_() for w in weights]
    opt = run(cls, params, grads, foreach=foreach)
    expected = reference(
        cls, [w.to(DT) for w in weights], [[g if g is None else g.to(DT) for g in r] for r in grads]
    )
    for i, (ours, ref) in enumerate(zip(params, expected)):
        assert ours.dtype == dtype and torch.isfinite(ours).all()
        scale = max(norm(ref) / ref.numel() ** 0.5, 1e-3)  # rms of the tensor
        moved = (ref - weights[i].to(DT)).abs().max().item()
        assert moved > 2 * tol * scale, "the steps must move further than the tolerance"
        torch.testing.assert_close(ours.detach().to(DT), ref, rtol=tol, atol=tol * scale,
                                   msg=f"tensor {i} {SHAPES[i]}")  # fmt: skip
    for _, ratio in opt.last_trust_ratios():
        assert torch.isfinite(ratio).all()


@PATHS
@pytest.mark.parametrize("variant", ["nus", "authors"])
def test_lamb_variants_with_other_strides(variant, foreach):
    """LAMB nus and authors also run Adam's fused kernel (without bias correction): the same
    stride rule applies."""
    from test_optim_variants import ref_lamb_variant

    weights, grads = odd_stride_problem()
    params = as_odd_params(weights)
    opt = LAMB(params, variant=variant, foreach=foreach, **LAMB_KW)
    for row in grads:
        for p, g in zip(params, row):
            p.grad = g.clone()
            p.grad.set_(p.grad.contiguous())
        opt.step()
    ref = ref_lamb_variant(weights, grads, [True] * len(weights), nus=variant == "nus", **LAMB_REF)[
        0
    ]
    for ours, expected in zip(params, ref):
        torch.testing.assert_close(ours.detach(), expected, rtol=1e-12, atol=1e-13)
