"""The training step: mixed precision, channels_last, clipping after the allreduce."""

from __future__ import annotations

import pytest
import torch
from conftest import check_ok, require_distributed, run_script

from lars.checkpoint import list_checkpoints, load_checkpoint
from lars.models import build_model

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
