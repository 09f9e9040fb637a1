"""Adasum: the parameter values of the plain path against a float64 reference, and the
combinations that cannot be made right refused up front.

Horovod's Adasum optimizer makes each parameter's local optimizer step inside the backward hook
(the update is applied before `step()`), reduces the local updates with Adasum, and `step()`
sets w = w_start + Adasum(delta_0, delta_1). For two ranks and one tensor (Maleki et al. 2021,
"Scaling distributed training with adaptive summation", MLSys; per tensor, as Horovod does):

    Adasum(a, b) = (1 - a.b / (2 |a|^2)) a + (1 - a.b / (2 |b|^2)) b

Each rank's optimizer state (LARS momentum) follows its own gradients. Because the update is
made inside the backward pass, unscaling (--amp fp16), clipping (--clip-grad-norm) and skipping
a non-finite step (--nonfinite skip) cannot come before it, so those are refused (exit 2).
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from conftest import ROOT, require_distributed, run_script

from lars.cli import main

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from lars.distributed import HorovodBackend
    from lars.metrics import TrainMeter
    from lars.optim import LARS
    from lars.schedules import build_scheduler
    from lars.step import StepContext, optimizer_step

    dist = HorovodBackend(adasum=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    initial = {n: p.detach().clone().tolist() for n, p in model.named_parameters()}
    optimizer = LARS(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01,
                     trust_coefficient=0.02)
    optimizer = dist.wrap_optimizer(optimizer, model, 1)
    scheduler = build_scheduler(optimizer, schedule="constant", total_steps=10, warmup_steps=0)
    ctx = StepContext(model=model, loss_fn=torch.nn.CrossEntropyLoss(), optimizer=optimizer,
                      scheduler=scheduler, dist=dist, device=torch.device("cpu"),
                      batches_per_allreduce=1)
    generator = torch.Generator().manual_seed(100 + dist.rank)
    x = torch.randn(8, 4, generator=generator)
    y = torch.randint(0, 3, (8,), generator=generator)
    meter = TrainMeter("cpu")
    for _ in range(3):
        optimizer_step(ctx, iter([(x, y, [])]), meter, [])
    final = {n: p.detach().tolist() for n, p in model.named_parameters()}
    with open(sys.argv[1] + f"/rank{dist.rank}.json", "w") as handle:
        json.dump({"initial": initial, "final": final}, handle)
    dist.shutdown()
    """
)


def _data(rank):
    generator = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(8, 4, generator=generator)
    return x.double(), torch.randint(0, 3, (8,), generator=generator)


def _gradients(weight, bias, x, y):
    """d/dW, d/db of the mean cross-entropy of softmax(x W^T + b), written out."""
    logits = x @ weight.T + bias
    p = torch.softmax(logits, dim=1)
    p[torch.arange(len(y)), y] -= 1.0
    p /= len(y)
    return p.T @ x, p.sum(dim=0)


def _lars_delta(w, g, v, lr=0.5, m=0.9, wd=0.01, eta=0.02):
    """One LARS step (You et al. 2017, Alg. 1) from w: the new momentum and the update."""
    wn, gn = w.norm(), g.norm()
    trust = eta * wn / (gn + wd * wn) if wn > 0 and gn > 0 else 1.0
    v = m * v + lr * trust * (g + wd * w)
    return v, -v


def _adasum(a, b):
    dot = (a * b).sum()
    return (1 - dot / (2 * (a * a).sum())) * a + (1 - dot / (2 * (b * b).sum())) * b


@pytest.mark.distributed
def test_adasum_parameter_values_match_a_float64_reference(tmp_path):
    require_distributed()
    script = tmp_path / "adasum_run.py"
    script.write_text(SCRIPT)
    result = run_script([tmp_path], np=2, script=script, env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    initial = ranks[0]["initial"]
    w, b = _reference(initial, _adasum)
    for rank in (0, 1):
        final = ranks[rank]["final"]
        got_w, got_b = (torch.tensor(final[k], dtype=torch.float64) for k in ("weight", "bias"))
        torch.testing.assert_close(got_w, w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_b, b, rtol=1e-5, atol=1e-6)
    # The reference tells Adasum from plain averaging of the same local updates.
    averaged, _ = _reference(initial, lambda a, b: (a + b) / 2)
    assert (averaged - w).abs().max() > 1e-3


def _reference(initial, combine):
    """Three steps: each rank's LARS update from its own gradient and momentum, combined."""
    w = torch.tensor(initial["weight"], dtype=torch.float64)
    b = torch.tensor(initial["bias"], dtype=torch.float64)
    momentum = [[torch.zeros_like(w), torch.zeros_like(b)] for _ in range(2)]
    for _ in range(3):
        deltas = []
        for rank in (0, 1):
            gw, gb = _gradients(w, b, *_data(rank))
            momentum[rank][0], dw = _lars_delta(w, gw, momentum[rank][0])
            momentum[rank][1], db = _lars_delta(b, gb, momentum[rank][1])
            deltas.append((dw, db))
        w = w + combine(deltas[0][0], deltas[1][0])
        b = b + combine(deltas[0][1], deltas[1][1])
    return w, b


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--clip-grad-norm", "1", "--nonfinite", "abort"], "--clip-grad-norm"),
        (["--amp", "fp16", "--nonfinite", "abort"], "--amp fp16"),
        (["--nonfinite", "skip"], "--nonfinite skip"),
        (["--nonfinite", "abort", "--max-nonfinite", "3"], "--max-nonfinite 3"),
    ],
)
def test_combinations_that_cannot_be_made_right_exit_2(extra, named, capsys):
    status = main(["--dry-run", "--model", "tinycnn", "--use-adasum", *extra])
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1 and named in err and "--use-adasum" in err, err


def test_adasum_with_abort_plans(capsys):
    assert main(["--dry-run", "--model", "tinycnn", "--use-adasum", "--nonfinite", "abort"]) == 0


@pytest.mark.distributed
def test_a_non_finite_adasum_step_aborts_without_a_bad_checkpoint(tmp_path):
    """The update is already made when the gradients are checked: the run stops at once and
    the newest checkpoint is the last good step."""
    from lars.checkpoint import list_checkpoints, load_checkpoint
    from lars.faults import NONFINITE_EXIT_STATUS

    require_distributed()
    log_dir = tmp_path / "run"
    argv = ["--model", "tinycnn", "--workers", "0", "--threads", "1", "--epochs", "1"]
    argv += ["--use-adasum", "--nonfinite", "abort", "--checkpoint-every-steps", "1"]
    result = run_script(
        [*argv, "--max-steps", "6", "--batch-size", "16", "--log-dir", log_dir],
        np=2,
        script=ROOT / "tests" / "helpers" / "inject_nan.py",
        env={"NAN_AT_CALLS": "3"},
    )
    assert result.returncode == NONFINITE_EXIT_STATUS, result.stderr
    newest = load_checkpoint(list_checkpoints(log_dir)[0])
    assert newest["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in newest["model"].values())
