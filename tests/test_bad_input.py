"""Bad input, exhaustively: every numeric flag, every path flag, every rejected combination.

Each bad input gets exit status 2 and, as the last line on stderr, one line naming the flag;
never a traceback. A default that conflicts with the user's own flags is named as a default,
with the flag that changes it. Numeric and combination cases run `--dry-run` in this process
(the checks come before any heavy work); path cases that need a real start run as processes.
"""

from __future__ import annotations

import math

import pytest
from conftest import run_script

from lars.cli import main
from lars.config import parse_settings
from lars.errors import SettingError

# flag -> (type, whether 0 is a valid value). Every numeric flag of the trainer.
NUMERIC = {
    "--epochs": (int, False),
    "--batch-size": (int, False),
    "--val-batch-size": (int, False),
    "--batches-per-allreduce": (int, False),
    "--max-steps": (int, False),
    "--lr-reference-batch": (int, False),
    "--image-size": (int, False),
    "--workers": (int, True),
    "--threads": (int, False),
    "--ranks": (int, False),
    "--seed": (int, True),
    "--log-interval": (int, False),
    "--keep-checkpoints": (int, False),
    "--checkpoint-every-steps": (int, False),
    "--max-nonfinite": (int, False),
    "--train-images": (int, False),
    "--label-smoothing": (float, True),
    "--base-lr": (float, False),
    "--momentum": (float, True),
    "--wd": (float, True),
    "--trust-coefficient": (float, False),
    "--lmbda": (float, True),
    "--tv-alpha": (float, False),
    "--tv-delay-epochs": (float, True),
    "--tv-min-scale": (float, True),
    "--warmup-epochs": (float, True),
    "--lr-power": (float, False),
    "--end-lr": (float, True),
    "--clip-grad-norm": (float, False),
    "--stall-timeout": (float, False),
    "--val-crop-ratio": (float, False),
    "--min-crop-scale": (float, False),
}
HUGE = {int: str(10**15), float: "1e300"}
# Flags a value needs company for (TVLARS's flags only mean something for tvlars).
CONTEXT = {
    "--lmbda": ["--base-op", "tvlars"],
    "--tv-alpha": ["--base-op", "tvlars"],
    "--tv-delay-epochs": ["--base-op", "tvlars"],
    "--tv-min-scale": ["--base-op", "tvlars"],
}


def _outcome(argv, capsys) -> tuple[int, str]:
    try:
        status = main(["--dry-run", "--model", "tinycnn", *argv])
    except SystemExit as exit_:  # argparse's own errors (bad type)
        status = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    return status, lines[-1] if lines else ""


def _rejected(argv, capsys, *needles) -> str:
    status, line = _outcome(argv, capsys)
    assert status == 2, f"{argv}: exit {status}, {line!r}"
    for needle in needles:
        assert needle in line, f"{argv}: {line!r} does not name {needle!r}"
    return line


CASES = [
    (flag, value)
    for flag in NUMERIC
    for value in ("0", "-1", "nan", "inf", "-inf", HUGE[NUMERIC[flag][0]])
]


@pytest.mark.parametrize("flag, value", CASES, ids=[f"{f}={v}" for f, v in CASES])
def test_every_numeric_flag(flag, value, capsys):
    kind, zero_ok = NUMERIC[flag]
    argv = [*CONTEXT.get(flag, []), flag, value]
    if value in ("-1", "nan", "inf", "-inf") or (value == "0" and not zero_ok):
        _rejected(argv, capsys, flag)
        return
    status, line = _outcome(argv, capsys)
    # 0 where it is meaningful passes; a huge value passes or is refused, naming the flag.
    assert status in (0, 2), line
    if status == 2:
        assert flag in line, line
    else:
        assert value != "0" or zero_ok


@pytest.mark.parametrize("value", ["1e-320", str(math.pi)])
def test_ordinary_values_still_pass(value, capsys):
    assert _outcome(["--base-lr", value], capsys)[0] == 0


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--dataset", "cifar10"], ["--dataset cifar10", "--data-dir"]),
        (["--dataset", "cifar10", "--data-dir", "/tmp", "--train-dir", "/tmp"], ["--train-dir"]),
        (["--data-dir", "/tmp"], ["--data-dir"]),
        (["--val-dir", "/tmp"], ["--val-dir"]),
        (["--train-dir", "/tmp"], ["--val-dir"]),
        (["--base-op", "tvlars", "--schedule", "poly"], ["--schedule poly"]),
        (["--schedule", "none", "--warmup-epochs", "1"], ["--warmup-epochs"]),
        (["--epochs", "2", "--warmup-epochs", "3"], ["--warmup-epochs 3"]),
        (["--use-adasum", "--clip-grad-norm", "1", "--nonfinite", "abort"], ["--clip-grad-norm"]),
        (["--use-adasum", "--amp", "fp16", "--nonfinite", "abort"], ["--amp fp16"]),
        (["--use-adasum", "--backend", "torch", "--nonfinite", "abort"], ["--use-adasum"]),
        (["--batch-size", "2000"], ["--batch-size"]),
        (["--ranks", "100000"], ["--ranks"]),
        (["--optimizer-variant", "nope"], ["--optimizer-variant"]),
        (["--base-op", "sgd", "--optimizer-variant", "paper"], ["--optimizer-variant"]),
        (["--allow-change", "no-such-setting"], ["--allow-change"]),
        (["--evaluate", "--resume", "none"], ["--evaluate"]),
        (["--evaluate"], ["--evaluate"]),  # with --dry-run
        (["--tv-delay-epochs", "9", "--base-op", "tvlars", "--epochs", "4"], ["--tv-delay-epochs"]),
        (["--data-backend", "dali-gpu", "--no-cuda"], ["--data-backend dali-gpu", "--no-cuda"]),
    ],
)
def test_rejected_combinations(argv, needles, capsys):
    _rejected(argv, capsys, *needles)


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--dataset", "imagenet"], ["--dataset imagenet", "--train-dir"]),
        (["--train-images", "100"], ["--train-images"]),
        (["--evaluate", "--resume", "none"], ["--evaluate"]),
    ],
)
def test_rejected_outside_a_dry_run(argv, needles):
    """Checked when the flags are read: a run that would start is never reached."""
    with pytest.raises(SettingError) as raised:
        parse_settings(["--model", "tinycnn", *argv])
    line = str(raised.value)
    assert "\n" not in line and all(needle in line for needle in needles), line


def test_a_conflicting_default_is_named_as_a_default(sample_root, capsys):
    """ImageFolder data defaults to 5 warm-up epochs; --epochs 1 conflicts with that default."""
    data = ["--train-dir", str(sample_root / "train"), "--val-dir", str(sample_root / "val")]
    line = _rejected([*data, "--epochs", "1"], capsys, "--epochs 1", "--warmup-epochs")
    assert "default" in line, line
    line = _rejected(["--schedule", "none"], capsys, "--warmup-epochs")
    assert "default" in line, line
    line = _rejected(["--use-adasum"], capsys, "--nonfinite")
    assert "default" in line, line


# ------------------------------------------------------------------------- path flags
def _paths(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not what was asked for\n")
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 not a checkpoint")
    return {"missing": tmp_path / "missing", "file": a_file, "empty": empty, "garbage": garbage}


PATH_CASES = [
    ("--train-dir", "missing"),
    ("--train-dir", "file"),
    ("--train-dir", "empty"),
    ("--val-dir", "missing"),
    ("--val-dir", "file"),
    ("--val-dir", "empty"),
    ("--data-dir", "missing"),
    ("--data-dir", "file"),
    ("--data-dir", "empty"),
    ("--log-dir", "file"),
    ("--log-dir", "under-a-file"),
    ("--resume", "missing"),
    ("--resume", "empty"),
    ("--config", "missing"),
    ("--config", "empty"),
    ("--config", "garbage"),
]


@pytest.mark.parametrize("flag, kind", PATH_CASES, ids=[f"{f}={k}" for f, k in PATH_CASES])
def test_every_path_flag(flag, kind, tmp_path, sample_root, capsys):
    paths = _paths(tmp_path)
    path = paths["file"] / "sub" if kind == "under-a-file" else paths[kind]
    argv = {
        "--train-dir": ["--train-dir", path, "--val-dir", sample_root / "val"],
        "--val-dir": ["--train-dir", sample_root / "train", "--val-dir", path],
        "--data-dir": ["--dataset", "cifar10", "--data-dir", path],
    }.get(flag, [flag, path])
    if flag != "--log-dir":
        argv += ["--log-dir", tmp_path / "run"]
    status, line = _outcome(list(map(str, argv)), capsys)
    assert status == 2 and flag in line, line
    if kind == "file":
        assert paths["file"].read_text() == "not what was asked for\n"


def test_a_checkpoint_that_is_not_one(tmp_path):
    """Read when the run starts (a real process): one line, exit 2."""
    garbage = _paths(tmp_path)["garbage"]
    tiny = ["--model", "tinycnn", "--workers", "0", "--threads", "1", "--max-steps", "1"]
    result = run_script([*tiny, "--resume", garbage, "--log-dir", tmp_path / "run"])
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--resume" in lines[0] and "Traceback" not in result.stderr
