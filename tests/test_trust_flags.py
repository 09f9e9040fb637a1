"""The LARS family's split by default, --optimizer-variant, and --dry-run without the data."""

from __future__ import annotations

import json
import re

import pytest
from conftest import check_ok, run_script

from lars.checkpoint import list_checkpoints, load_checkpoint
from lars.cli import main

TINY = ["--model", "tinycnn", "--workers", "0", "--threads", "1", "--epochs", "1"]


def _dry_run(argv, capsys) -> str:
    assert main(["--dry-run", *argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def _groups(text: str) -> list[str]:
    return re.findall(r"^param group \d+: .*$", text, re.M)


# ---------------------------------------------------------------- the split by default
@pytest.mark.parametrize("optimizer", ["lars", "tvlars", "lamb"])
def test_the_lars_family_excludes_biases_and_norms_by_default(optimizer, capsys):
    """Before: one param group, every bias and BatchNorm weight decayed and adapted."""
    out = _dry_run(["--model", "resnet18_small", "--base-op", optimizer], capsys)
    groups = _groups(out)
    assert len(groups) == 2, out
    assert "weight_decay=0.0" in groups[1] and "layer_adaptation=False" in groups[1]
    assert "--bn-bias-separately" in out  # the summary says which rule made the split
    old = _groups(_dry_run(["--model", "resnet18_small", "--base-op", optimizer,
                            "--no-bn-bias-separately"], capsys))  # fmt: skip
    assert len(old) == 1


def test_other_optimizers_keep_one_group_unless_asked(capsys):
    assert len(_groups(_dry_run(["--model", "resnet18_small", "--base-op", "sgd"], capsys))) == 1
    asked = ["--model", "resnet18_small", "--base-op", "sgd", "--bn-bias-separately"]
    assert len(_groups(_dry_run(asked, capsys))) == 2


def test_a_run_trains_with_the_split_and_says_so(tmp_path):
    log_dir = tmp_path / "run"
    out = check_ok(run_script([*TINY, "--max-steps", "1", "--log-dir", log_dir]))
    assert len(_groups(out)) == 2, out
    groups = load_checkpoint(list_checkpoints(log_dir)[0])["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [5e-5, 0.0]
    assert [g["layer_adaptation"] for g in groups] == [True, False]
    assert json.loads((log_dir / "config.json").read_text())["args"]["bn_bias_separately"]


# ---------------------------------------------------------------- --optimizer-variant
@pytest.mark.parametrize("optimizer", ["lars", "tvlars", "lamb"])
def test_every_variant_is_accepted_and_shown(optimizer, capsys):
    from lars.factory import OPTIMIZER_SPECS

    variants = OPTIMIZER_SPECS[optimizer].load().VARIANTS
    for variant in variants:
        argv = ["--model", "tinycnn", "--base-op", optimizer, "--optimizer-variant", variant]
        out = _dry_run(argv, capsys)
        assert all(f"variant={variant}" in group for group in _groups(out)), out
    status = main(["--dry-run", "--base-op", optimizer, "--optimizer-variant", "nope"])
    err = capsys.readouterr().err
    assert status == 2 and "--optimizer-variant" in err and variants[0] in err, err


def test_the_variant_is_recorded_and_part_of_the_run_identity(tmp_path):
    dirs = []
    for variant in ("you2017", "nus"):
        log_dir = tmp_path / variant
        argv = [*TINY, "--optimizer-variant", variant, "--max-steps", "1", "--log-dir", log_dir]
        check_ok(run_script(argv))
        config = json.loads((log_dir / "config.json").read_text())
        assert config["args"]["optimizer_variant"] == variant
        dirs.append(config["fingerprint"])
    assert dirs[0] != dirs[1]
    refused = run_script(
        [*TINY, "--optimizer-variant", "nus", "--max-steps", "2", "--log-dir", tmp_path / "you2017"]
    )
    assert refused.returncode == 2 and "--optimizer-variant you2017 -> nus" in refused.stderr


# ---------------------------------------------------------------- dry run without the data
def test_an_imagenet_plan_without_imagenet(capsys):
    out = _dry_run(
        ["--dataset", "imagenet", "--batch-size", "128", "--ranks", "8", "--model", "resnet50"],
        capsys,
    )
    assert "1,281,167 train" in out and "1000 classes" in out, out
    assert "1251 per epoch" in out  # ceil(1281167 / 8) // 128
    assert re.search(r"fingerprint\s+[0-9a-f]{8}", out), out


def test_train_images_sizes_a_plan_whose_folders_are_absent(tmp_path, capsys):
    missing = ["--train-dir", str(tmp_path / "no-train"), "--val-dir", str(tmp_path / "no-val")]
    out = _dry_run([*missing, "--train-images", "50000", "--batch-size", "100", "--ranks", "2"],
                   capsys)  # fmt: skip
    assert "50,000 train" in out and "250 per epoch" in out, out


def test_train_images_is_for_dry_runs_only(capsys):
    assert main(["--train-images", "100"]) == 2
    assert "--train-images" in capsys.readouterr().err


# ---------------------------------------------------------------- --data-backend
def test_synthetic_is_an_alias_of_the_synthetic_data_backend(tmp_path):
    for argv, name in ((["--synthetic"], "alias"), (["--data-backend", "synthetic"], "flag")):
        log_dir = tmp_path / name
        command = [*TINY, *argv, "--image-size", "32", "--warmup-epochs", "0", "--max-steps", "1"]
        command += ["--log-dir", log_dir]
        check_ok(run_script(command))
        config = json.loads((log_dir / "config.json").read_text())
        assert config["args"]["data_backend"] == "synthetic", config["args"]
