"""The training step: its order (in-process, with a recording backend), mixed precision,
channels_last, clipping after the allreduce."""

from __future__ import annotations

import pytest
import torch
from conftest import check_ok, require_distributed, run_script

from lars.checkpoint import list_checkpoints, load_checkpoint
from lars.distributed import LocalBackend
from lars.models import build_model
from lars.step import StepContext, optimizer_step

TINY = ["--model", "tinycnn", "--resume", "none", "--workers", "0", "--threads", "1"]


def _checkpoint(log_dir):
    return load_checkpoint(list_checkpoints(log_dir)[0])


@pytest.mark.parametrize("extra", [["--amp", "bf16"], ["--amp", "fp16"], ["--channels-last"]])
def test_precision_and_memory_format_variants_train(tmp_path, extra):
    out = check_ok(
        run_script(
            [*TINY, "--max-steps", "3", "--batch-size", "16", *extra, "--log-dir", tmp_path / "run"]
        )
    )
    assert "done: 3 steps" in out
    state = _checkpoint(tmp_path / "run")
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    if extra == ["--amp", "fp16"]:  # the gradient scaler travels with the checkpoint
        assert state["scaler"]["scale"] > 0
    else:
        assert state["scaler"] is None


def test_fp16_resume_restores_the_scaler(tmp_path):
    common = [
        "--model",
        "tinycnn",
        "--workers",
        "0",
        "--threads",
        "1",
        "--amp",
        "fp16",
        "--batch-size",
        "16",
        "--log-dir",
        tmp_path / "run",
    ]
    check_ok(run_script([*common, "--max-steps", "2"]))
    assert _checkpoint(tmp_path / "run")["scaler"]["scale"] > 0
    out = check_ok(run_script([*common, "--max-steps", "4"]))
    assert "resumed at step 2" in out
    assert _checkpoint(tmp_path / "run")["global_step"] == 4


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_clipping_acts_on_the_averaged_gradient(tmp_path, backend):
    """SGD, lr 1, no momentum or decay, one step, clip 1e-3: the weights move by exactly the
    clip norm. Clipping each rank's gradient before averaging would move them by less."""
    require_distributed()
    clip = 1e-3
    check_ok(
        run_script(
            [
                *TINY,
                "--base-op",
                "sgd",
                "--base-lr",
                "1",
                "--momentum",
                "0",
                "--wd",
                "0",
                "--schedule",
                "constant",
                "--warmup-epochs",
                "0",
                "--max-steps",
                "1",
                "--batch-size",
                "16",
                "--clip-grad-norm",
                clip,
                "--backend",
                backend,
                "--channels-last",
                "--log-dir",
                tmp_path / "run",
            ],
            np=2,
        )
    )
    torch.manual_seed(42)  # the trainer's --seed: the same initial weights
    initial = build_model("tinycnn", 10).state_dict()
    after = _checkpoint(tmp_path / "run")["model"]
    moved = torch.sqrt(sum(((after[k] - initial[k]).double() ** 2).sum() for k in initial))
    assert moved.item() == pytest.approx(clip, rel=1e-3)


class RecordingBackend(LocalBackend):
    """One process, recording the backend verbs the step calls, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.grad_norm_at_step: float | None = None

    def micro_batch(self, model, last: bool):
        self.calls.append(f"micro_batch(last={last})")
        return super().micro_batch(model, last)

    def synchronize(self, optimizer) -> None:
        self.calls.append("synchronize")

    def all_finite(self, finite) -> bool:
        self.calls.append("all_finite")
        return super().all_finite(finite)

    def step(self, optimizer) -> None:
        self.calls.append("step")
        grads = [p.grad.double() for g in optimizer.param_groups for p in g["params"]]
        self.grad_norm_at_step = float(torch.sqrt(sum((g**2).sum() for g in grads)))
        super().step(optimizer)

    def skip_synchronize(self, optimizer):
        self.calls.append("skip_synchronize")
        return super().skip_synchronize(optimizer)


def _context(k: int, clip=None, scaler=None):
    model = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = StepContext(
        model=model,
        loss_fn=torch.nn.MSELoss(),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        dist=RecordingBackend(),
        device=torch.device("cpu"),
        batches_per_allreduce=k,
        clip_grad_norm=clip,
        scaler=scaler,
    )
    return ctx, model


def _micro_batches(k: int, nan_at: int | None = None):
    generator = torch.Generator().manual_seed(0)
    batches = []
    for i in range(k):
        images = torch.randn(4, 3, generator=generator, dtype=torch.float64)
        targets = torch.randn(4, 2, generator=generator, dtype=torch.float64)
        if i == nan_at:
            images[0, 0] = float("nan")
        batches.append((images, targets))
    return batches


class _NoMeter:
    def update(self, loss, output, labels) -> None:
        pass


def _run_step(ctx, batches) -> bool:
    stream = iter([(x.float(), y.float(), []) for x, y in batches] + [("unused", None, [])])
    return optimizer_step(ctx, stream, _NoMeter(), [])


def _reference_gradient(weight, batches):
    """float64: d/dW of (1/k) sum_j mean((x_j W^T - y_j)^2), from the formula."""
    w = weight.detach().double()
    total = torch.zeros_like(w)
    for x, y in batches:
        residual = x @ w.T - y  # (n, 2)
        total += 2.0 * residual.T @ x / residual.numel()
    return total / len(batches)


def test_step_order_with_a_recording_backend():
    """k micro-batches (DDP's no_sync for all but the last), then synchronise, the finite
    verdict and one step; the update is the float64 mean over the k micro-batch gradients."""
    k = 3
    ctx, model = _context(k)
    batches = _micro_batches(k)
    before = model.weight.detach().clone()
    assert _run_step(ctx, batches) is True
    assert ctx.dist.calls == [
        "micro_batch(last=False)",
        "micro_batch(last=False)",
        "micro_batch(last=True)",
        "synchronize",
        "all_finite",
        "step",
    ]
    expected = before.double() - 0.1 * _reference_gradient(before, batches)
    torch.testing.assert_close(model.weight.detach().double(), expected, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())  # zero_grad after the step
    assert ctx.scheduler.last_epoch == 1


def test_clipping_happens_between_synchronize_and_step():
    ctx, model = _context(2, clip=1e-3)
    batches = _micro_batches(2)
    assert _reference_gradient(model.weight, batches).norm() > 1e-2  # clipping has work to do
    _run_step(ctx, batches)
    assert ctx.dist.grad_norm_at_step == pytest.approx(1e-3, rel=1e-5)


def test_a_non_finite_step_is_skipped_but_scheduled():
    ctx, model = _context(2)
    before = model.weight.detach().clone()
    assert _run_step(ctx, _micro_batches(2, nan_at=1)) is False
    assert "step" not in ctx.dist.calls and ctx.dist.calls[-1] == "all_finite"
    assert torch.equal(model.weight.detach(), before)
    assert ctx.scheduler.last_epoch == 1  # the LR schedule still advances (documented rule)
    assert all(p.grad is None for p in model.parameters())


def test_fp16_scaler_steps_without_a_second_synchronisation():
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    ctx, model = _context(2, scaler=scaler)
    batches = _micro_batches(2)
    before = model.weight.detach().clone()
    assert _run_step(ctx, batches) is True
    assert ctx.dist.calls[-2:] == ["synchronize", "skip_synchronize"]
    expected = before.double() - 0.1 * _reference_gradient(before, batches)  # unscaled
    torch.testing.assert_close(model.weight.detach().double(), expected, rtol=1e-5, atol=1e-6)
