"""End-to-end runs of pytorch_imagenet_resnet.py under `mpirun -np 2` on the sample set (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, check_ok, require_distributed, run_script

from lars.checkpoint import list_checkpoints, load_checkpoint

pytestmark = pytest.mark.distributed

TINY = ["--model", "tinycnn", "--resume", "none", "--workers", "0", "--threads", "1"]


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def _final_params(log_dir):
    payload = load_checkpoint(list_checkpoints(log_dir)[0])
    return payload, {k: v.double() for k, v in payload["model"].items()}


def test_two_ranks_write_tensorboard_and_config_and_learn(tmp_path):
    require_distributed()
    log_dir = tmp_path / "run"
    out = check_ok(
        run_script(
            [
                *TINY,
                "--base-op",
                "tvlars",
                "--base-lr",
                "10",
                "--lmbda",
                "0.01",
                "--epochs",
                "2",
                "--batch-size",
                "16",
                "--log-interval",
                "5",
                "--log-dir",
                log_dir,
            ],
            np=2,
        )
    )
    assert "2 rank(s)" in out and out.count("val loss") == 2  # rank 0 alone prints
    scalars = _scalars(log_dir)
    for tag in (
        "train/loss",
        "train/top1",
        "train/lr",
        "train/images_per_sec",
        "val/loss",
        "val/top1",
        "val/top5",
        "tvlars/phi",
        "trust_ratio/features.0.weight",
        "trust_ratio/fc.weight",
    ):
        assert tag in scalars, sorted(scalars)
    losses = [value for _, value in scalars["train/loss"]]
    assert losses[-1] < 0.8 * losses[0], losses
    assert scalars["val/top1"][-1][1] > 30.0  # 10 classes: chance is 10%
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert events.PluginTagToContent("hparams")  # the HParams tab: settings + final metrics
    config = json.loads((log_dir / "config.json").read_text())
    assert config["plan"]["world_size"] == 2 and config["plan"]["global_batch_size"] == 32
    assert config["plan"]["steps_per_epoch"] == 1438 // 2 // 16
    assert config["backend"] == "horovod" and config["versions"]["torch"].startswith("2.")


def test_gradient_accumulation_is_exact_across_world_sizes(tmp_path):
    """1 rank 8 x 4, 2 ranks 8 x 2 and 2 ranks 16 x 1: one global batch of 32, same params."""
    require_distributed()
    common = [
        *TINY,
        "--base-op",
        "lars",
        "--base-lr",
        "2",
        "--wd",
        "1e-4",
        "--bn-bias-separately",
        "--warmup-epochs",
        "0",
        "--max-steps",
        "3",
        "--hflip",
        "--min-crop-scale",
        "0.3",
    ]
    results = {}
    for np_, batch, k in ((1, 8, 4), (2, 8, 2), (2, 16, 1)):
        log_dir = tmp_path / f"np{np_}-b{batch}-k{k}"
        check_ok(
            run_script(
                [
                    *common,
                    "--batch-size",
                    batch,
                    "--batches-per-allreduce",
                    k,
                    "--log-dir",
                    log_dir,
                ],
                np=np_,
            )
        )
        payload, params = _final_params(log_dir)
        assert payload["global_step"] == 3
        results[(np_, batch, k)] = params
    reference = results[(1, 8, 4)]
    for key, params in results.items():
        for name, value in params.items():
            torch.testing.assert_close(
                value, reference[name], rtol=1e-4, atol=1e-6, msg=f"{key} {name}"
            )


def test_accumulation_with_a_different_global_batch_differs(tmp_path):
    """Guards the exactness test: 2 ranks x 8 x 1 (global 16) must not match 1 x 8 x 4."""
    require_distributed()
    common = [
        *TINY,
        "--base-op",
        "lars",
        "--base-lr",
        "2",
        "--warmup-epochs",
        "0",
        "--max-steps",
        "2",
        "--batch-size",
        "8",
    ]
    check_ok(run_script([*common, "--log-dir", tmp_path / "a", "--batches-per-allreduce", 4]))
    check_ok(run_script([*common, "--log-dir", tmp_path / "b"], np=2))
    _, a = _final_params(tmp_path / "a")
    _, b = _final_params(tmp_path / "b")
    assert max((a[n] - b[n]).abs().max().item() for n in a) > 1e-4


def test_allreduce_once_per_k_micro_batches(tmp_path):
    require_distributed()
    count_dir = tmp_path / "counts"
    count_dir.mkdir()
    steps, k = 2, 3
    check_ok(
        run_script(
            [
                *TINY,
                "--batch-size",
                "8",
                "--batches-per-allreduce",
                k,
                "--max-steps",
                steps,
                "--log-dir",
                tmp_path / "run",
            ],
            np=2,
            script=ROOT / "tests" / "helpers" / "count_allreduce.py",
            env={"COUNT_DIR": str(count_dir)},
        )
    )
    tensors = 6  # tinycnn: 3 weights and 3 biases
    for rank in (0, 1):
        calls = json.loads((count_dir / f"rank{rank}.json").read_text())["allreduce"]
        assert calls == steps * tensors, calls  # not steps * k * tensors


def test_validation_metrics_are_whole_set_metrics(tmp_path, sample_root):
    """359 validation images over 2 ranks (180 + 179): no padding, no per-rank averaging."""
    require_distributed()
    log_dir = tmp_path / "run"
    check_ok(
        run_script(
            [
                *TINY,
                "--base-lr",
                "2",
                "--max-steps",
                "8",
                "--batch-size",
                "16",
                "--val-batch-size",
                "50",
                "--log-dir",
                log_dir,
            ],
            np=2,
        )
    )
    payload, _ = _final_params(log_dir)
    reported = payload["last_validation"]

    from lars.data.fast import FastImageFolder, normalize_batch
    from lars.data.loaders import collate_skipping_bad
    from lars.distributed import LocalBackend
    from lars.metrics import evaluate
    from lars.models import build_model

    model = build_model("tinycnn", 10)
    model.load_state_dict(payload["model"])
    val = FastImageFolder(str(sample_root / "val"), train=False, image_size=32, crop_ratio=1.0)
    loader = torch.utils.data.DataLoader(val, batch_size=359, collate_fn=collate_skipping_bad)
    expected = evaluate(
        model,
        loader,
        LocalBackend(),
        torch.device("cpu"),
        prepare=lambda x: normalize_batch(x, "cpu"),
    )
    assert reported["samples"] == expected["samples"] == 359
    for key in ("top1", "top5", "loss"):
        assert reported[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-4), key


def test_seed_readme_command_line_runs(tmp_path, sample_root):
    """The LARS-ImageNet README command, with sample paths and tiny sizes, on 2 ranks."""
    require_distributed()
    argv = (
        "--epochs 90 --model resnet50 --batch-size 2 --warmup-epochs 0.3125 "
        f"--train-dir={sample_root / 'train'} --val-dir={sample_root / 'val'} "
        "--base-lr 5.6568542494924 --base-op lars --bn-bias-separately --wd 0.0001 "
        "--lr-scaling keep --batches-per-allreduce 4"
    ).split()
    out = check_ok(
        run_script(
            [
                *argv,
                "--image-size",
                "32",
                "--max-steps",
                "2",
                "--val-batch-size",
                "64",
                "--log-dir",
                tmp_path / "run",
                "--workers",
                "0",
                "--threads",
                "1",
            ],
            np=2,
        )
    )
    assert "global batch 16 = 2 x 2 x 4" in out
    assert "done: 2 steps" in out
    tags = _scalars(tmp_path / "run")
    assert "trust_ratio/conv1.weight" in tags and "trust_ratio/layer1.0.downsample.0.weight" in tags
    # --bn-bias-separately: normalisation layers (downsample.1 included) and biases not adapted
    assert "trust_ratio/bn1.weight" not in tags and "trust_ratio/fc.bias" not in tags
    assert "trust_ratio/layer1.0.downsample.1.weight" not in tags


def test_torch_backend_matches_horovod_and_runs_under_torchrun(tmp_path):
    """Same seed, same data: Horovod, torch.distributed under mpirun, and under torchrun."""
    require_distributed()
    import shutil
    import subprocess
    import sys

    common = [
        *TINY,
        "--base-op",
        "lars",
        "--base-lr",
        "2",
        "--warmup-epochs",
        "0",
        "--max-steps",
        "3",
        "--batch-size",
        "8",
        "--batches-per-allreduce",
        "2",
    ]
    check_ok(run_script([*common, "--backend", "horovod", "--log-dir", tmp_path / "hvd"], np=2))
    out = check_ok(run_script([*common, "--backend", "torch", "--log-dir", tmp_path / "ddp"], np=2))
    assert "2 rank(s) (torch, cpu)" in out
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    script = str(ROOT / "pytorch_imagenet_resnet.py")
    result = subprocess.run(
        [
            torchrun,
            "--nproc-per-node",
            "2",
            script,
            *map(str, common),
            "--backend",
            "torch",
            "--log-dir",
            str(tmp_path / "torchrun"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    check_ok(result)
    _, hvd = _final_params(tmp_path / "hvd")
    for other in ("ddp", "torchrun"):
        _, params = _final_params(tmp_path / other)
        for name, value in params.items():
            torch.testing.assert_close(value, hvd[name], rtol=1e-5, atol=1e-7, msg=other + name)


@pytest.mark.parametrize(
    "extra",
    [
        ["--fp16-allreduce"],
        ["--use-adasum", "--nonfinite", "abort"],  # Adasum cannot skip a step (lars.checks)
        ["--fp16-allreduce", "--backend", "torch"],
    ],
)
def test_allreduce_variants_run(tmp_path, extra):
    require_distributed()
    out = check_ok(
        run_script(
            [*TINY, "--max-steps", "2", "--batch-size", "8", *extra, "--log-dir", tmp_path / "run"],
            np=2,
        )
    )
    assert "done: 2 steps" in out


def test_adasum_needs_horovod(tmp_path):
    require_distributed()
    result = run_script(
        [
            *TINY,
            "--max-steps",
            "2",
            "--use-adasum",
            "--backend",
            "torch",
            "--log-dir",
            tmp_path / "run",
        ],
        np=2,
    )
    assert result.returncode == 2 and "--use-adasum" in result.stderr
