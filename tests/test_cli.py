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


@pytest.mark.parametrize("argv, needle", [
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
])
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
        ["--train-dir", str(tmp_path / "train"), "--val-dir", str(tmp_path / "val"),
         "--model", "tinycnn", "--log-dir", str(tmp_path / "run"), "--resume", "none"],
        capsys, "empty_class")


def test_class_lists_must_match(tmp_path, sample_root, capsys):
    import shutil

    shutil.copytree(sample_root / "train", tmp_path / "train")
    shutil.copytree(sample_root / "val", tmp_path / "val")
    shutil.rmtree(tmp_path / "val" / "7")
    _fails_with_usage_error(
        ["--train-dir", str(tmp_path / "train"), "--val-dir", str(tmp_path / "val"),
         "--model", "tinycnn", "--log-dir", str(tmp_path / "run"), "--resume", "none"],
        capsys, "different class folders")


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
