"""Bad input gets one line on stderr and exit status 2; the seed's flags parse and resolve."""

from __future__ import annotations

import pytest
from conftest import run_script

from lars.cli import main
from lars.config import parse_args

SEED_COMMAND = (
    "--epochs 90 --model resnet50 --batch-size 128 --warmup-epochs 0.3125 "
    "--train-dir={train} --val-dir={val} --base-lr 5.6568542494924 --base-op lars "
    "--bn-bias-separately --wd 0.0001 --lr-scaling keep --batches-per-allreduce 4"
)


def _fails_with_usage_error(argv, capsys, needle: str) -> None:
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own errors (unknown choice, bad type)
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and needle in lines[-1], err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--train-dir", "/nonexistent/train", "--val-dir", "/nonexistent/val"], "--train-dir"),
        (["--train-dir", "/tmp"], "--val-dir"),
        (["--model", "resnet5000"], "--model"),
        (["--base-op", "lion"], "--base-op"),
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "-3"], "--batch-size"),
        (["--batches-per-allreduce", "0"], "--batches-per-allreduce"),
        (["--epochs", "2", "--warmup-epochs", "3"], "--warmup-epochs"),
        (["--base-op", "tvlars", "--schedule", "poly"], "tvlars"),
        (["--momentum", "1.5"], "--momentum"),
        (["--base-op", "tvlars", "--warmup-epochs", "1"], "--schedule none"),
        (["--lr-scaling", "cubic"], "--lr-scaling"),
        (["--resume", "/nonexistent.pt"], "--resume"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, needle, capsys):
    _fails_with_usage_error(argv, capsys, needle)


def test_log_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("mine")
    _fails_with_usage_error(["--log-dir", str(target)], capsys, "--log-dir")
    assert target.read_text() == "mine"  # nothing the user made is lost


def test_empty_class_folder_is_reported(tmp_path, sample_root, capsys):
    import shutil

    for split in ("train", "val"):
        shutil.copytree(sample_root / split, tmp_path / split)
    (tmp_path / "train" / "empty_class").mkdir()
    (tmp_path / "val" / "empty_class").mkdir()
    _fails_with_usage_error(
        [
            "--train-dir",
            str(tmp_path / "train"),
            "--val-dir",
            str(tmp_path / "val"),
            "--model",
            "tinycnn",
            "--log-dir",
            str(tmp_path / "run"),
            "--resume",
            "none",
        ],
        capsys,
        "empty_class",
    )


def test_class_lists_must_match(tmp_path, sample_root, capsys):
    import shutil

    shutil.copytree(sample_root / "train", tmp_path / "train")
    shutil.copytree(sample_root / "val", tmp_path / "val")
    shutil.rmtree(tmp_path / "val" / "7")
    _fails_with_usage_error(
        [
            "--train-dir",
            str(tmp_path / "train"),
            "--val-dir",
            str(tmp_path / "val"),
            "--model",
            "tinycnn",
            "--log-dir",
            str(tmp_path / "run"),
            "--resume",
            "none",
        ],
        capsys,
        "different class folders",
    )


def test_bad_input_as_a_real_process():
    result = run_script(["--model", "nope"])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--model" in result.stderr
    assert "Traceback" not in result.stderr


def test_seed_command_line_resolves(sample_root):
    argv = SEED_COMMAND.format(train=sample_root / "train", val=sample_root / "val").split()
    args = parse_args(argv)
    assert (args.model, args.batch_size, args.batches_per_allreduce) == ("resnet50", 128, 4)
    assert args.base_op == "lars" and args.bn_bias_separately and args.wd == 1e-4
    assert args.warmup_epochs == 0.3125 and args.schedule == "poly" and args.lr_power == 2.0
    assert args.dataset == "imagefolder" and args.image_size == 224


def test_dataset_dependent_defaults():
    sample = parse_args([])
    assert sample.dataset == "sample" and sample.model == "resnet18_small"
    assert sample.image_size == 32
    tv = parse_args(["--base-op", "tvlars"])
    assert tv.schedule == "none" and tv.warmup_epochs == 0.0


def test_config_file_sets_defaults_and_flags_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "base-op: lamb\nbatch_size: 16\nwarmup-epochs: 0.25\nhflip: true\n--schedule: cosine\n"
    )
    args = parse_args(["--config", str(config), "--batch-size", "8"])
    assert (args.base_op, args.batch_size, args.warmup_epochs) == ("lamb", 8, 0.25)
    assert args.schedule == "cosine" and args.hflip is True and args.base_lr == 0.01


@pytest.mark.parametrize(
    "text, needle",
    [
        ("base-op: lion\n", "lion"),
        ("batch-sise: 3\n", "batch-sise"),
        ("epochs: many\n", "epochs"),
        ("- just\n- a list\n", "mapping"),
        ("base-op: [unclosed\n", "YAML"),
        ("batch-size: 0\n", "--batch-size"),
    ],
)
def test_bad_config_files_exit_2(tmp_path, capsys, text, needle):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    _fails_with_usage_error(["--config", str(config)], capsys, needle)


def test_missing_config_file(capsys):
    _fails_with_usage_error(["--config", "/nonexistent.yaml"], capsys, "--config")


def test_resolved_configuration_from_a_file_is_saved(tmp_path):
    import json

    config = tmp_path / "run.yaml"
    config.write_text("base_op: sgd\nmodel: tinycnn\nmax-steps: 2\nworkers: 0\n")
    result = run_script(["--config", config, "--log-dir", tmp_path / "run", "--base-lr", "0.05"])
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["args"]["base_op"] == "sgd" and saved["args"]["base_lr"] == 0.05
    assert saved["plan"]["lr"] == 0.05


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    status = main(
        [
            "--dry-run",
            "--ranks",
            "8",
            "--batch-size",
            "4",
            "--batches-per-allreduce",
            "2",
            "--lr-scaling",
            "linear",
            "--base-lr",
            "0.1",
            "--epochs",
            "10",
            "--warmup-epochs",
            "2",
            "--log-dir",
            str(tmp_path / "run"),
        ]
    )
    out = capsys.readouterr().out
    assert status == 0
    # 1438 images / 8 ranks -> 180 per rank -> 45 micro-batches -> 22 steps per epoch
    assert "global batch       64 = 4 per micro-batch x 8 ranks x 2" in out
    assert "learning rate      0.025 = linear scaling of base 0.1" in out
    assert "22 per epoch x 10 epochs = 220; warm-up 44 steps" in out
    assert "lr at step       44 (epoch    2.00): 0.025" in out
    assert "lr at step       22 (epoch    1.00): 0.0125" in out
    assert "param group 0:" in out
    assert not (tmp_path / "run").exists()


def test_progress_bar_on_a_terminal(tmp_path):
    import os
    import pty
    import subprocess
    import sys

    from conftest import ROOT, SCRIPT

    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "--model",
            "tinycnn",
            "--max-steps",
            "12",
            "--workers",
            "0",
            "--log-dir",
            str(tmp_path / "run"),
        ],
        cwd=ROOT,
        stdout=terminal,
        stderr=subprocess.DEVNULL,
    )
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=120)
    text = b"".join(chunks).decode(errors="replace")
    assert process.returncode == 0
    assert "\repoch 1/4 [" in text and "12/176" in text and "ETA" in text


def test_no_progress_bar_under_mpirun_or_in_a_log(tmp_path):
    """Under mpirun a rank's stdout is a pseudo-terminal even when the job writes to a file."""
    from conftest import require_distributed

    require_distributed()
    out = run_script(
        [
            "--model",
            "tinycnn",
            "--max-steps",
            "3",
            "--workers",
            "0",
            "--log-interval",
            "1",
            "--log-dir",
            tmp_path / "run",
        ],
        np=2,
    )
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stdout and "step 3/" in out.stdout
