"""lars.report: event files written by TensorBoard's SummaryWriter -> PNG plots and summary.md."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lars.report import PLOTS, SUMMARY_FILE, load_run, main, run_labels, write_report

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS_PER_EPOCH = 10


def write_config(folder: Path, optimizer: str, global_batch: int, lr: float) -> None:
    config = {
        "args": {"base_op": optimizer, "model": "tinycnn", "epochs": 3, "batch_size": 32},
        "plan": {
            "steps_per_epoch": STEPS_PER_EPOCH,
            "global_batch_size": global_batch,
            "lr": lr,
            "total_steps": 3 * STEPS_PER_EPOCH,
        },
    }
    (folder / "config.json").write_text(json.dumps(config))


def log_epochs(folder: Path, epochs: range, top1: dict[int, float], purge_step=None) -> None:
    """What the trainer logs: train scalars every step, val scalars and trust ratios per epoch."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder), purge_step=purge_step)
    for epoch in epochs:
        for step in range(epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH + 1):
            writer.add_scalar("train/loss", 3.0 / step, step)
            writer.add_scalar("train/lr", 0.1 * step, step)
            writer.add_scalar("train/top1", 10.0 + step, step)
            writer.add_scalar("trust_ratio/conv.weight", 0.002 * step, step)
            writer.add_scalar("trust_ratio/fc.weight", 0.004 * step, step)
        step = (epoch + 1) * STEPS_PER_EPOCH
        writer.add_scalar("val/top1", top1[epoch], step)
        writer.add_scalar("val/top5", min(100.0, top1[epoch] + 20.0), step)
        writer.add_scalar("val/loss", 1.0 / (epoch + 1), step)
    writer.close()


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    dirs = {name: root / name for name in ("lars-gb64", "lamb-gb64", "tvlars-resumed")}
    for folder in dirs.values():
        folder.mkdir()
    write_config(dirs["lars-gb64"], "lars", 64, 2.0)
    log_epochs(dirs["lars-gb64"], range(3), {0: 40.0, 1: 70.0, 2: 91.25})
    write_config(dirs["lamb-gb64"], "lamb", 64, 0.01)
    log_epochs(dirs["lamb-gb64"], range(3), {0: 35.0, 1: 60.0, 2: 88.5})
    # A run stopped during epoch 3 and resumed from its checkpoint at step 10 (end of epoch 1):
    # the resumed writer purges steps >= 11, so the first attempt's epoch-2 figures (12.0 %)
    # must not survive, and the epoch-1 ones, logged at the checkpoint's step, must.
    write_config(dirs["tvlars-resumed"], "tvlars", 128, 4.0)
    log_epochs(dirs["tvlars-resumed"], range(2), {0: 30.0, 1: 12.0})
    # Event file names start with the time in whole seconds: start the resumed one a second later.
    time.sleep(1.01 - time.time() % 1.0)
    log_epochs(
        dirs["tvlars-resumed"], range(1, 3), {1: 65.0, 2: 80.75}, purge_step=STEPS_PER_EPOCH + 1
    )
    return dirs


def read_table(summary: Path) -> dict[str, dict[str, str]]:
    lines = [line for line in summary.read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: dict(zip(header, row)) for row in rows}


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 300 and height >= 200, (path, width, height)
    assert len(data) > 8_000, f"{path} is only {len(data)} bytes: nothing drawn?"


def test_load_run_reads_scalars_config_and_purged_resume(run_dirs):
    run = load_run(run_dirs["tvlars-resumed"])
    assert run.name == "tvlars-resumed"
    assert run.optimizer == "tvlars" and run.steps_per_epoch == STEPS_PER_EPOCH
    assert run.scalars["val/top1"] == [(10, 30.0), (20, 65.0), (30, 80.75)]
    assert [step for step, _ in run.scalars["train/loss"]] == list(range(1, 31))
    assert run.final("val/top1") == 80.75 and run.last_step() == 30


def test_mean_trust_ratio_averages_every_tag_per_step(run_dirs):
    run = load_run(run_dirs["lars-gb64"])
    mean = dict(run.mean_trust_ratio())
    assert sorted(mean) == list(range(1, 31))
    for step in (1, 17, 30):  # tags are 0.002 * step and 0.004 * step
        assert mean[step] == pytest.approx(0.003 * step, rel=1e-6)


def test_labels_are_optimizers_made_unique_with_the_folder(run_dirs, tmp_path):
    runs = [load_run(run_dirs[name]) for name in ("lars-gb64", "lamb-gb64")]
    assert run_labels(runs) == ["lars", "lamb"]
    twin = tmp_path / "lars-gb128"
    twin.mkdir()
    write_config(twin, "lars", 128, 2.0)
    log_epochs(twin, range(1), {0: 50.0})
    labels = run_labels([runs[0], load_run(twin)])
    assert labels == ["lars (lars-gb64)", "lars (lars-gb128)"]


def test_write_report_in_process(run_dirs, tmp_path):
    runs = [load_run(folder) for folder in run_dirs.values()]
    out = tmp_path / "report"
    written = write_report(runs, out)
    assert [path.name for path in written] == [name for name, *_ in PLOTS] + [SUMMARY_FILE]
    for path in written[:-1]:
        check_png(path)
    table = read_table(out / SUMMARY_FILE)
    assert set(table) == set(run_dirs)
    lars = table["lars-gb64"]
    assert lars["optimizer"] == "lars" and lars["global batch"] == "64" and lars["lr"] == "2"
    assert lars["steps"] == "30"
    assert lars["val top-1 (%)"] == "91.25" and lars["val top-5 (%)"] == "100.00"
    assert lars["val loss"] == f"{1 / 3:.4f}" and lars["train loss"] == f"{3.0 / 30:.4f}"
    assert table["lamb-gb64"]["val top-1 (%)"] == "88.50" and table["lamb-gb64"]["lr"] == "0.01"
    resumed = table["tvlars-resumed"]
    assert resumed["val top-1 (%)"] == "80.75" and resumed["global batch"] == "128"


def test_run_without_config_is_named_by_its_folder(tmp_path):
    folder = tmp_path / "bare-run"
    folder.mkdir()
    log_epochs(folder, range(1), {0: 42.0})
    run = load_run(folder)
    assert run.config == {} and run_labels([run]) == ["bare-run"]
    written = write_report([run], tmp_path / "out")  # x axis falls back to optimizer steps
    row = read_table(written[-1])["bare-run"]
    assert row["optimizer"] == "n/a" and row["global batch"] == "n/a"
    assert row["val top-1 (%)"] == "42.00"


def test_bad_input_exits_2_with_one_line(run_dirs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    for event_file in run_dirs["lamb-gb64"].glob("events.out.tfevents.*"):
        (broken / event_file.name).write_bytes(event_file.read_bytes())
    (broken / "config.json").write_text("{not json")
    for bad, named in (
        (tmp_path / "missing", "missing"),
        (empty, "empty"),
        (broken, "config.json"),
    ):
        assert main([str(run_dirs["lars-gb64"]), str(bad), "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and named in err, err
    assert not (tmp_path / "r").exists()  # nothing written when an input is bad


def command_line(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "lars.report", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_command_line(run_dirs, tmp_path):
    out = tmp_path / "cli-report"
    result = command_line(*map(str, run_dirs.values()), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert [Path(line).name for line in result.stdout.split()] == (
        [name for name, *_ in PLOTS] + [SUMMARY_FILE]
    )
    for name, *_ in PLOTS:
        check_png(out / name)
    assert read_table(out / SUMMARY_FILE)["lars-gb64"]["val top-1 (%)"] == "91.25"
