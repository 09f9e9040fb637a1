"""Run identity as pure functions: lars.fingerprint over plain settings mappings."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from conftest import ROOT

from lars.fingerprint import (
    NOT_TRAJECTORY,
    differing_settings,
    fingerprint,
    format_differences,
    refused_changes,
    short_fingerprint,
    trajectory_settings,
)

SETTINGS = {
    "dataset": "sample",
    "model": "tinycnn",
    "base_op": "lars",
    "base_lr": 2.0,
    "wd": 5e-5,
    "epochs": 4,
    "seed": 42,
    "batch_size": 32,
    "global_batch_size": 64,
    "amp": "none",
    "log_dir": "runs/a",
    "workers": 3,
    "threads": 1,
    "progress": "auto",
}


def test_the_fingerprint_is_sha256_of_the_sorted_trajectory_settings():
    # Written out from the definition: the trajectory keys, numbers as floats, sorted JSON.
    expected = {
        "amp": "none",
        "base_lr": 2.0,
        "base_op": "lars",
        "batch_size": 32.0,
        "dataset": "sample",
        "epochs": 4.0,
        "global_batch_size": 64.0,
        "model": "tinycnn",
        "seed": 42.0,
        "wd": 5e-5,
    }
    text = json.dumps(expected, sort_keys=True)
    assert fingerprint(SETTINGS) == hashlib.sha256(text.encode()).hexdigest()
    assert short_fingerprint(SETTINGS) == fingerprint(SETTINGS)[:8]
    assert short_fingerprint(fingerprint(SETTINGS)) == short_fingerprint(SETTINGS)


def test_order_nesting_and_int_float_do_not_matter_but_values_do():
    reordered = dict(reversed(list(SETTINGS.items())))
    assert fingerprint(reordered) == fingerprint(SETTINGS)
    assert fingerprint({**SETTINGS, "base_lr": 2}) == fingerprint(SETTINGS)
    assert fingerprint({**SETTINGS, "base_lr": 2.0000001}) != fingerprint(SETTINGS)
    nested = {"optimizer": {"base_lr": 2.0}, "run": {"seed": 42}}
    assert fingerprint(nested) != fingerprint({"optimizer": {"base_lr": 2.0}, "run": {"seed": 1}})
    assert trajectory_settings(nested) == {"optimizer.base_lr": 2.0, "run.seed": 42.0}


@pytest.mark.parametrize("key", sorted(NOT_TRAJECTORY))
def test_settings_that_do_not_shape_the_trajectory_leave_it_alone(key):
    assert fingerprint({**SETTINGS, key: "changed"}) == fingerprint(SETTINGS)
    assert fingerprint({"run": {**SETTINGS, key: 123}}) == fingerprint({"run": SETTINGS})


@pytest.mark.parametrize(
    "key, value",
    [
        ("base_lr", 8.0),
        ("wd", 0.5),
        ("epochs", 5),
        ("seed", 1),
        ("model", "resnet18_small"),
        ("amp", "bf16"),
        ("batch_size", 16),
        ("global_batch_size", 128),
        ("a_setting_added_later", True),  # unknown keys count until excluded on purpose
    ],
)
def test_settings_that_shape_the_trajectory_change_it(key, value):
    assert fingerprint({**SETTINGS, key: value}) != fingerprint(SETTINGS)


def test_the_fingerprint_is_the_same_in_another_process():
    code = (
        "import json, sys; from lars.fingerprint import fingerprint; "
        "print(fingerprint(json.loads(sys.argv[1])))"
    )
    for seed in ("0", "123"):
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(SETTINGS)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
            check=True,
        ).stdout.strip()
        assert out == fingerprint(SETTINGS)


def test_every_difference_is_listed_with_old_and_new_values():
    new = {**SETTINGS, "base_lr": 8.0, "wd": 0.5, "log_dir": "elsewhere", "extra": 1}
    diffs = differing_settings(SETTINGS, new)
    assert diffs == [("base_lr", 2.0, 8.0), ("extra", None, 1), ("wd", 5e-5, 0.5)]
    assert format_differences(diffs) == "base_lr 2 -> 8, extra (unset) -> 1, wd 5e-05 -> 0.5"
    flags = format_differences(diffs, name=lambda k: "--" + k.replace("_", "-"))
    assert flags.startswith("--base-lr 2 -> 8")
    assert differing_settings(SETTINGS, dict(SETTINGS)) == []


def test_a_setting_missing_from_an_old_checkpoint_is_compared_with_its_default():
    new = {**SETTINGS, "optimizer_variant": "paper"}
    assert differing_settings(SETTINGS, new, defaults={"optimizer_variant": "paper"}) == []
    assert differing_settings(SETTINGS, new, defaults={"optimizer_variant": "other"}) == [
        ("optimizer_variant", None, "paper")
    ]


def test_allowed_changes_are_split_from_refused_ones_and_fixed_settings_never_pass():
    diffs = [("base_lr", 2.0, 8.0), ("epochs", 4, 8), ("model", "a", "b")]
    refused, allowed = refused_changes(diffs, ["epochs", "model"])
    assert refused == [("base_lr", 2.0, 8.0), ("model", "a", "b")]
    assert allowed == [("epochs", 4, 8)]
    refused, allowed = refused_changes([("schedule.epochs", 4, 8)], ["epochs"])
    assert (refused, allowed) == ([], [("schedule.epochs", 4, 8)])
