"""lars.sweep: grid expansion, bad specs, fingerprint-based skipping, a real 2x2 sweep and its
table, the SLURM array (fake sbatch and srun on PATH), and every shipped spec's --dry-run."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import require_distributed

from lars.sweep.cli import main
from lars.sweep.flags import FlagTable
from lars.sweep.run import newest_checkpoint_step, plan_points, point_state
from lars.sweep.spec import SpecError, load_spec
from lars.sweep.trainer import DryRun, trainer_parser

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
ARRAY_SCRIPT = ROOT / "launch" / "sweep_array.sbatch"
TINY = {"model": "tinycnn", "epochs": 1, "batch-size": 32, "threads": 1, "workers": 0}


def write_spec(folder: Path, doc: dict, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def parser():
    return trainer_parser()


def test_grid_cases_ranks_and_seeds_expand_in_order(tmp_path, parser):
    spec = load_spec(
        write_spec(
            tmp_path,
            {
                "flags": {"model": "tinycnn", "epochs": "3"},
                "grid": {"base-lr": [1, 2], "wd": [0.0, 1e-4]},
                "cases": [
                    {"label": "A", "flags": {"base_op": "lars"}},
                    {"label": "B", "flags": {"--base-op": "lamb"}, "grid": {"base-lr": [0.01]}},
                ],
                "ranks": [1, 2],
                "seeds": [7, 8],
            },
        ),
        parser,
    )
    got = [(p.label, p.flags["--base-lr"], p.flags["--wd"], p.ranks, p.seed) for p in spec.points]
    expected = [
        (label, lr, wd, ranks, seed)
        for label, lrs in (("A", [1.0, 2.0]), ("B", [0.01]))
        for lr in lrs
        for wd in (0.0, 1e-4)
        for ranks in (1, 2)
        for seed in (7, 8)
    ]
    assert got == expected
    first = spec.points[0]
    assert first.flags["--epochs"] == 3 and isinstance(first.flags["--base-lr"], float)
    assert first.flags["--base-op"] == "lars" and spec.points[-1].flags["--base-op"] == "lamb"
    assert first.swept == {"--base-lr": 1.0, "--wd": 0.0, "ranks": 1}
    assert spec.points[9].column_position == {"--base-lr": 1, "--wd": 0}
    assert [p.index for p in spec.points] == list(range(1, 25))


def test_flags_become_the_trainers_words(parser):
    import argparse

    table = FlagTable(parser)
    actions = [a for a in parser._actions if a.option_strings and a.option_strings[0] != "-h"]
    optional = next(a for a in actions if isinstance(a, argparse.BooleanOptionalAction))
    store_true = next(a for a in actions if a.nargs == 0 and a.const is True)
    on_off, switch = FlagTable.option(optional), FlagTable.option(store_true)
    words = table.argv({"--base-lr": 2.0, switch: True, on_off: False})
    assert words == ["--base-lr", "2.0", switch, "--no-" + on_off[2:]]
    assert table.argv({switch: False, on_off: True}) == [on_off]
    assert parser.parse_args(words).base_lr == 2.0  # the trainer's parser reads them back


@pytest.mark.parametrize(
    "doc, words",
    [
        ({"flags": {"learning-rate": 1}}, ["--learning-rate", "not a flag of the trainer"]),
        ({"grid": {"base-lr": []}}, ["--base-lr", "empty"]),
        ({"grid": {"base-op": ["lars", "adamax"]}}, ["--base-op", "'adamax' is not one of"]),
        ({"flags": {"epochs": "many"}}, ["--epochs", "not a valid int"]),
        ({"flags": {"log-dir": "x"}}, ["--log-dir", "own log dir"]),
        ({"grid": {"base-lr": [1, 1.0]}}, ["--base-lr", "repeats a value"]),
        ({"seeds": [1], "flags": {"seed": 3}}, ["--seed"]),
        ({"color": "red"}, ["unknown key 'color'"]),
        ({"grid": {"wd": [0, 1e-4]}, "table": {"columns": "base-lr"}}, ["not a swept axis"]),
    ],
)
def test_bad_specs_are_named_before_anything_runs(tmp_path, capsys, doc, words):
    path = write_spec(tmp_path, {"out": str(tmp_path / "runs"), **doc})
    assert main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"lars.sweep: error: {path}")
    for word in words:
        assert word in err
    assert not (tmp_path / "runs").exists()


def test_a_value_the_trainer_rejects_names_spec_point_and_flag(tmp_path, capsys):
    path = write_spec(
        tmp_path,
        {
            "out": str(tmp_path / "runs"),
            "flags": TINY,
            "grid": {"base-lr": [1.0, -2.0]},
        },
    )
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"lars.sweep: error: {path}: point 2 (base-lr=-2.0)")
    assert "--base-lr" in err.split("point 2", 1)[1]
    assert not (tmp_path / "runs").exists()  # point 1 did not run either


def test_a_pending_spec_says_why(tmp_path, capsys):
    path = write_spec(tmp_path, {"pending": "needs --task barlowtwins (issue 13)", "flags": TINY})
    assert main([str(path), "--dry-run"]) == 2
    assert "pending: needs --task barlowtwins (issue 13)" in capsys.readouterr().err


def _planned(tmp_path, parser, lrs):
    doc = {"out": str(tmp_path / "runs"), "flags": TINY, "grid": {"base-lr": lrs}}
    spec = load_spec(write_spec(tmp_path, doc), parser)
    planned = plan_points(spec, FlagTable(parser))
    for item in planned:
        item.dry = DryRun(status=0, message="", output="", steps_per_epoch=44, epochs=1)
        item.dry.total_steps = 44
    return planned


def test_fingerprint_decides_the_log_dir_and_what_is_done(tmp_path, parser):
    first = _planned(tmp_path, parser, [1.0, 2.0])
    again = _planned(tmp_path, parser, [2.0, 1.0, 4.0])  # reordered, one value added
    assert len({item.log_dir for item in first}) == 2
    assert again[0].log_dir == first[1].log_dir and again[1].log_dir == first[0].log_dir
    assert again[2].log_dir not in {item.log_dir for item in first}
    done, partial = first
    done.log_dir.mkdir(parents=True)
    (done.log_dir / "checkpoint-000000044.pt").write_bytes(b"")
    partial.log_dir.mkdir(parents=True)
    (partial.log_dir / "checkpoint-000000020.pt").write_bytes(b"")
    assert newest_checkpoint_step(done.log_dir) == 44
    assert [point_state(item) for item in again] == ["partial", "done", "new"]


def _read_events(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """Independent reader: every `tag` value in the folder's event files, by step."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    values = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tensor_util.make_ndarray(value.tensor))
    return sorted(values.items())


def _csv_cells(path: Path) -> dict[tuple[str, str], dict]:
    with open(path) as handle:
        return {(row["row"], row["column"]): row for row in csv.DictReader(handle)}


@pytest.mark.slow
def test_a_2x2_sweep_runs_skips_what_is_done_and_tabulates(tmp_path, capsys):
    doc = {
        "name": "two-by-two",
        "out": str(tmp_path / "runs"),
        "flags": {**TINY, "max-steps": 2},
        "grid": {"base-lr": [1.0, 2.0]},
        "cases": [
            {"label": "LARS", "flags": {"base-op": "lars"}},
            {"label": "LAMB", "flags": {"base-op": "lamb"}, "grid": {"base-lr": [0.01, 0.02]}},
        ],
        "table": {"columns": "base-lr", "column-by": "position", "baseline": 1},
    }
    path = write_spec(tmp_path, doc)
    assert main([str(path)]) == 0
    dirs = sorted((tmp_path / "runs" / "two-by-two").iterdir())
    assert len(dirs) == 4 and all(newest_checkpoint_step(d) == 2 for d in dirs)
    events_before = sorted(p.name for d in dirs for p in d.glob("events.*"))
    capsys.readouterr()

    assert main([str(path)]) == 0  # everything is done: nothing runs again
    assert capsys.readouterr().out.count("done, skipped") == 4
    assert sorted(p.name for d in dirs for p in d.glob("events.*")) == events_before

    out = tmp_path / "report"
    assert main([str(path), "report", "--out", str(out)]) == 0
    cells = _csv_cells(out / "report.csv")
    assert set(cells) == {(r, c) for r in ("LARS", "LAMB") for c in ("#1", "#2")}
    for (row, column), cell in cells.items():
        log_dir = Path(cell["log_dirs"])
        config = json.loads((log_dir / "config.json").read_text())
        base_op, lr = config["args"]["base_op"], config["args"]["base_lr"]
        assert base_op == row.lower()
        assert lr == {"LARS": [1.0, 2.0], "LAMB": [0.01, 0.02]}[row][int(column[1:]) - 1]
        top1, top5 = _read_events(log_dir, "val/top1"), _read_events(log_dir, "val/top5")
        assert float(cell["final_top1_mean"]) == pytest.approx(top1[-1][1], abs=1e-4)
        assert float(cell["best_top1_mean"]) == pytest.approx(max(v for _, v in top1), abs=1e-4)
        assert float(cell["final_top5_mean"]) == pytest.approx(top5[-1][1], abs=1e-4)
        assert cell["runs"] == "1" and cell["final_top1_std"] == ""
    assert float(cells[("LARS", "#1")]["speedup"]) == pytest.approx(1.0)
    report = (out / "report.md").read_text()
    assert "| LARS | 1, 2 |" in report and "| LAMB | 0.01, 0.02 |" in report
    for name in ("val_top1_curves.png", "final_top1_vs_base-lr.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    doc["grid"]["base-lr"] = [1.0, 2.0, 4.0]  # a changed grid: one new point, four done
    write_spec(tmp_path, doc)
    assert main([str(path), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "5 point(s) (4 done, 1 new)" in listing
    new = [line for line in listing.splitlines() if " new " in line]
    assert len(new) == 1 and "LARS base-lr=4.0" in new[0]


def test_cells_average_seeds_with_the_sample_std(tmp_path, parser):
    from lars.sweep.results import PointResult, build_cells

    doc = {
        "flags": {**TINY, "base-op": "lars"},
        "grid": {"base-lr": [1.0, 2.0]},
        "seeds": [1, 2, 3],
    }
    spec = load_spec(write_spec(tmp_path, doc), parser)
    planned = plan_points(spec, FlagTable(parser))
    finals = [70.0, 72.0, 77.0, 50.0, 60.0, 40.0]
    results = [
        PointResult(
            item,
            best_top1=f + 1,
            final_top1=f,
            final_top5=99.0,
            images_per_sec=10.0,
            epoch_seconds=2.0,
            curve=[(1.0, f)],
        )
        for item, f in zip(planned, finals)
    ]
    rows, columns, cells = build_cells(spec, results, planned)
    assert rows == ["lars"] and columns == ["base-lr=1", "base-lr=2"]
    mean, std, n = cells[("lars", "base-lr=1")].stat("final_top1")
    assert (mean, n) == (73.0, 3)
    assert std == pytest.approx(((3**2 + 1**2 + 4**2) / 2) ** 0.5)
    assert cells[("lars", "base-lr=2")].stat("final_top1")[0] == statistics.fmean([50, 60, 40])


@pytest.mark.distributed
def test_one_point_under_mpirun_with_two_ranks(tmp_path):
    require_distributed()
    doc = {"out": str(tmp_path / "runs"), "flags": {**TINY, "max-steps": 1}, "ranks": 2}
    assert main([str(write_spec(tmp_path, doc))]) == 0
    (log_dir,) = (tmp_path / "runs" / "spec").iterdir()
    config = json.loads((log_dir / "config.json").read_text())
    assert config["plan"]["world_size"] == 2 and config["plan"]["global_batch_size"] == 64


FAKE = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$FAKE_LOG_DIR/{name}.args"
echo "Submitted batch job 77"
"""


def _fake_bin(tmp_path: Path, *names: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        (bin_dir / name).write_text(FAKE.format(name=name))
        (bin_dir / name).chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_LOG_DIR": str(tmp_path),
    }


def _args(path: Path) -> list[str]:
    return path.read_bytes().decode().split("\0")[:-1]


def test_array_script_parses():
    assert subprocess.run(["bash", "-n", str(ARRAY_SCRIPT)]).returncode == 0


def test_slurm_submits_one_array_whose_tasks_reach_slurm_sbatch(tmp_path):
    doc = {
        "name": "arr",
        "out": str(tmp_path / "runs"),
        "flags": TINY,
        "grid": {"base-lr": [1.0, 2.0, 4.0]},
        "ranks": 2,
        "slurm": {"parallel": 2, "sbatch-args": ["--time=1:00:00"]},
    }
    env = _fake_bin(tmp_path, "sbatch", "srun")
    spec_path = write_spec(tmp_path, doc)
    command = [sys.executable, "-m", "lars.sweep", str(spec_path), "--slurm"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    sbatch = _args(tmp_path / "sbatch.args")
    task_dir = Path(sbatch[-1])
    assert sbatch[:5] == [
        "--array=0-2%2",
        "--job-name=arr-r2",
        "--nodes=1",
        "--ntasks-per-node=2",
        "--gpus-per-node=2",
    ]
    assert sbatch[5:] == ["--time=1:00:00", str(ARRAY_SCRIPT), str(task_dir)]
    tasks = sorted(task_dir.glob("task-*.args"))
    assert len(tasks) == 3
    second = _args(tasks[1])
    assert second[second.index("--base-lr") + 1] == "2.0"
    log_dir = second[second.index("--log-dir") + 1]

    task_env = {
        **env,
        "SLURM_JOB_ID": "78",
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "LARS_VENV": str(Path(sys.executable).parents[1]),
    }
    task = subprocess.run(
        ["bash", str(ARRAY_SCRIPT), str(task_dir)],
        cwd=tmp_path,
        env=task_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert task.returncode == 0, task.stderr
    srun = _args(tmp_path / "srun.args")
    training = srun[srun.index("python") :]
    assert training[:2] == ["python", "pytorch_imagenet_resnet.py"]
    assert training[2:] == second and log_dir in training

    missing = subprocess.run(
        ["bash", str(ARRAY_SCRIPT), str(tmp_path / "nowhere")],
        env=task_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "no task file" in missing.stderr


def _skip_reason(spec) -> str | None:
    from lars.sweep.run import missing_data

    if spec.pending:
        return f"pending: {spec.pending}"
    table = FlagTable(trainer_parser())
    data_free = spec.train_images is not None and table.action("train-images") is not None
    for item in plan_points(spec, table):
        absent = missing_data(item)
        if absent and not data_free:
            return f"data not on this machine ({absent}) and the trainer has no --train-images yet"
    return None


# 90 points each: one trainer dry run a point (it builds the model) takes 20-100 s in all.
LARGE_SPECS = {"tvlars_table1_cifar10", "tvlars_table1_tinyimagenet"}


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.slow) if p.stem in LARGE_SPECS else p for p in SWEEPS],
    ids=[p.stem for p in SWEEPS],
)
def test_every_shipped_spec_passes_dry_run(path, parser, capsys):
    try:
        spec = load_spec(path, parser)
    except SpecError:
        pending = yaml.safe_load(path.read_text()).get("pending")
        if pending:
            pytest.skip(f"pending: {pending}")
        raise
    assert "hardware" in path.read_text().split("\n\n", 1)[0].lower(), "header needs hardware"
    reason = _skip_reason(spec)
    if reason:
        pytest.skip(reason)
    assert main([str(path), "--dry-run"]) == 0, capsys.readouterr().err
    assert f"{len(spec.points)} point(s)" in capsys.readouterr().out


def test_alexnet_bn_has_the_systemds_layers():
    import torch
    import torch.nn as nn

    from lars.alexnet_bn import alexnet_bn
    from lars.param_groups import param_groups

    model = alexnet_bn(num_classes=10)
    layers = list(model.features)
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    assert [layers[i].out_channels for i in convs] == [96, 256, 384, 384, 256]
    assert all(isinstance(layers[i + 1], nn.BatchNorm2d) for i in convs)
    lrn = [i for i, m in enumerate(layers) if isinstance(m, nn.LocalResponseNorm)]
    assert lrn == [convs[0] + 3, convs[1] + 3]  # conv, BN, ReLU, LRN: after the first two only
    dropouts = [m.p for m in model.classifier if isinstance(m, nn.Dropout)]
    assert dropouts == [0.5, 0.5]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 10)
    decayed, plain = param_groups(model, weight_decay=5e-4)
    bn = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert bn <= {id(p) for p in plain["params"]}
    assert not bn & {id(p) for p in decayed["params"]}


@pytest.mark.slow
def test_an_interrupted_point_resumes_in_its_own_log_dir(tmp_path, capsys):
    # --max-steps is not part of a run's identity (lars.fingerprint): a point stopped at step 1
    # of 2 is the same point, left partial, as an interrupted run would be.
    doc = {"out": str(tmp_path / "runs"), "flags": {**TINY, "max-steps": 1, "log-interval": 1}}
    path = write_spec(tmp_path, doc)
    assert main([str(path)]) == 0
    (log_dir,) = (tmp_path / "runs" / "spec").iterdir()
    doc["flags"]["max-steps"] = 2
    write_spec(tmp_path, doc)
    capsys.readouterr()
    assert main([str(path), "--dry-run"]) == 0
    assert "(1 partial)" in capsys.readouterr().out
    assert main([str(path)]) == 0
    assert "resuming in" in capsys.readouterr().out
    assert [d.name for d in (tmp_path / "runs" / "spec").iterdir()] == [log_dir.name]
    assert newest_checkpoint_step(log_dir) == 2
    files = sorted(log_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    steps_by_file = []
    for events in files:
        single = tmp_path / "one" / events.name
        single.parent.mkdir(exist_ok=True)
        single.write_bytes(events.read_bytes())
        steps_by_file.append([step for step, _ in _read_events(single.parent, "train/loss")])
        single.unlink()
    assert [s for s in steps_by_file if s] == [[1], [2]]  # the second run trained step 2 only


def test_a_barlow_twins_point_is_scored_by_its_linear_probe(tmp_path):
    """A --task barlowtwins run has no val/top1 of its own: the table takes the probe's
    linear/top1 and top5, and the curve is the k-NN monitor per pre-training epoch."""
    from torch.utils.tensorboard import SummaryWriter

    from lars.sweep.results import load_result
    from lars.sweep.run import MARKER, Planned

    log_dir = tmp_path / "bt"
    writer = SummaryWriter(str(log_dir))
    for step, knn in ((10, 0.5), (20, 0.75)):
        writer.add_scalar("ssl/knn_top1", knn, step)
    writer.add_scalar("linear/top1", 81.25, 22)
    writer.add_scalar("linear/top5", 99.5, 22)
    writer.close()
    config = {"args": {"task": "barlowtwins"}, "plan": {"steps_per_epoch": 10}}
    (log_dir / "config.json").write_text(json.dumps(config))
    (log_dir / MARKER).write_text(json.dumps({"status": "done", "fingerprint": "f"}))
    result = load_result(Planned(point=None, argv=[], fingerprint="f", log_dir=log_dir))
    assert result.final_top1 == result.best_top1 == pytest.approx(81.25)
    assert result.final_top5 == pytest.approx(99.5)
    assert result.curve == [(1.0, pytest.approx(0.5)), (2.0, pytest.approx(0.75))]
