"""The `--task` flags, the Barlow Twins recipe's defaults and the checks of this mode.

`lars.flags` declares these flags through `add_task_flags`, `lars.config.resolve` takes their
defaults from `task_defaults` (explicit flags win) and calls `check_task_flags`. Nothing here
imports torch.

The recipe is the original's (Zbontar et al. 2021, arXiv:2103.03230, section 4 and its
repository's main.py): LARS with biases and BatchNorm parameters excluded from weight decay and
adaptation, learning rates 0.2 (weights) and 0.0048 (biases and norms), both x global batch / 256,
weight decay 1.5e-6, 10 epochs of linear warm-up, then a cosine to 0.001 of the peak. It applies
with `--base-op lars`; TVLARS, LAMB and the others keep their usual defaults (`lars.factory`).
"""

from __future__ import annotations

import os

from lars.errors import SettingError

TASKS = ("classification", "barlowtwins")
# The settings of the task group (lars.settings.GROUPS["task"]): all None with --task
# classification, so a classification run's identity is what it was before the task existed.
TASK_SETTINGS = (
    "projector bt_lambda bt_compat norm_bias_lr knn_every knn_k knn_bank probe_epochs "
    "probe_lr probe_wd probe_batch_size probe_only"
).split()

BT_DEFAULTS = dict(
    projector="8192-8192-8192",
    bt_lambda=0.0051,  # the original's; the TVLARS repository's is 0.005
    bt_compat="none",
    knn_every=1,
    knn_k=200,
    knn_bank=10_000,
    probe_epochs=100,
    probe_lr=0.3,
    probe_batch_size=256,
    label_smoothing=0.0,
    bn_bias_separately=True,
)
# The embedded sample set (1,438 digits of 32 px) must pre-train and probe in minutes on a CPU.
# (resnet18_small pre-trains at about 6 images/s on 2 CPU cores, two views each: tinycnn.)
BT_SAMPLE_DEFAULTS = dict(
    model="tinycnn",
    epochs=20,
    projector="512-512-512",
    batch_size=128,
    knn_k=20,
    probe_epochs=10,
    probe_batch_size=64,
)
# The original's LARS recipe (with --base-op lars only), its update rule included: the
# `barlowtwins` variant of lars.optim.LARS (trust = eta ||w|| / ||g + wd w||).
BT_LARS_DEFAULTS = dict(
    base_lr=0.2,
    norm_bias_lr=0.0048,
    lr_scaling="linear",
    wd=1.5e-6,
    schedule="cosine",
    optimizer_variant="barlowtwins",
)
BT_WARMUP_EPOCHS = 10.0  # a tenth of --epochs when the run is shorter than 100 epochs
BT_END_LR_FRACTION = 0.001  # of the peak (scaled) rate
TVLARS_PROBE_WD = 5e-4  # the TVLARS repository's probe (--bt-compat tvlars)


def add_task_flags(t) -> None:
    """The "task" argument group (lars.flags)."""
    t.add_argument(
        "--task",
        choices=TASKS,
        default="classification",
        help="classification, or barlowtwins: self-supervised pre-training (Zbontar et al. "
        "2021) then a linear probe (default: classification)",
    )
    t.add_argument(
        "--projector",
        help="barlowtwins: projector widths (8192-8192-8192; sample set: 512-512-512)",
    )
    t.add_argument(
        "--bt-lambda", type=float, help="barlowtwins: off-diagonal weight lambda (0.0051)"
    )
    t.add_argument(
        "--bt-compat",
        choices=("none", "tvlars"),
        help="barlowtwins: tvlars reproduces the TVLARS repository's quirks (gradients / ranks, "
        "probe without eval mode, random test crops, probe wd 5e-4), for comparing with its "
        "numbers only (default: none)",
    )
    t.add_argument(
        "--norm-bias-lr",
        type=float,
        help="barlowtwins with lars: rate of biases and norms for the reference batch, scaled "
        "as --base-lr (0.0048)",
    )
    t.add_argument(
        "--knn-every", type=int, help="barlowtwins: k-NN monitor every N epochs, 0 off (1)"
    )
    t.add_argument("--knn-k", type=int, help="barlowtwins: k-NN neighbours (200; sample set: 20)")
    t.add_argument("--knn-bank", type=int, help="barlowtwins: k-NN bank, training images (10000)")
    t.add_argument(
        "--probe-epochs",
        type=int,
        help="barlowtwins: linear-probe epochs after pre-training, 0 none (100; sample set: 10)",
    )
    t.add_argument("--probe-lr", type=float, help="barlowtwins: probe SGD rate, cosine (0.3)")
    t.add_argument(
        "--probe-wd", type=float, help="barlowtwins: probe weight decay (1e-6; tvlars: 5e-4)"
    )
    t.add_argument("--probe-batch-size", type=int, help="barlowtwins: probe images per rank (256)")
    t.add_argument(
        "--probe-only",
        metavar="CHECKPOINT",
        help="barlowtwins: skip pre-training, probe the backbone of this checkpoint",
    )


def _warmup(epochs: float) -> float:
    return BT_WARMUP_EPOCHS if epochs >= 100 else epochs / 10.0


def task_defaults(values: dict, dataset_defaults: dict, ranks: int) -> dict:
    """The defaults `--task` decides, over the dataset's and the optimizer's (`lars.config`).
    `ranks` sizes the global batch for the recipe's end rate (0.001 x the scaled peak)."""
    from lars.schedules import scale_lr

    if values["task"] == "classification":
        return {name: None for name in TASK_SETTINGS}
    defaults = dict(BT_DEFAULTS)
    if values["dataset"] == "sample":
        defaults.update(BT_SAMPLE_DEFAULTS)
    defaults["norm_bias_lr"] = None
    defaults["probe_wd"] = TVLARS_PROBE_WD if values["bt_compat"] == "tvlars" else 1e-6
    if values["base_op"] == "lars":
        defaults.update(BT_LARS_DEFAULTS)
        if values["bn_bias_separately"] is False:  # one group: one rate
            defaults["norm_bias_lr"] = None
        epochs = values["epochs"] or defaults.get("epochs", dataset_defaults["epochs"])
        defaults["warmup_epochs"] = _warmup(epochs)
        base_lr = values["base_lr"] if values["base_lr"] is not None else defaults["base_lr"]
        batch = values["batch_size"] or defaults.get("batch_size", dataset_defaults["batch_size"])
        scaling = values["lr_scaling"] or defaults["lr_scaling"]
        peak = scale_lr(base_lr, batch * ranks, values["lr_reference_batch"], scaling)
        defaults["end_lr"] = BT_END_LR_FRACTION * peak
    return defaults


def check_task_flags(values: dict) -> None:
    """What `--task barlowtwins` cannot do, and task flags given without it; SettingError."""
    given = [name for name in TASK_SETTINGS if values[name] is not None]
    if values["task"] == "classification":
        if given:
            raise SettingError(f"--{given[0].replace('_', '-')} goes with --task barlowtwins")
        return
    refusals = {
        "batches_per_allreduce": "the loss of a global batch is not the mean of micro-batch "
        "losses (the cross-correlation is one per batch); use a larger --batch-size or more ranks",
        "label_smoothing": "there are no labels to smooth in pre-training",
        "use_adasum": "Adasum combines updates, not the exact gradient of the global batch",
        "compile": "not supported yet (the loss and BatchNorms communicate inside the forward)",
        "evaluate": "it scores a classifier; the probe scores a backbone (--probe-only)",
    }
    for name, why in refusals.items():
        value = values[name]
        if value not in (None, False, 0.0) and not (name == "batches_per_allreduce" and value == 1):
            raise SettingError(f"--task barlowtwins with --{name.replace('_', '-')}: {why}")
    if values["data_backend"] != "pytorch":
        raise SettingError(
            f"--task barlowtwins with --data-backend {values['data_backend']}: the view pairs "
            "come from the pytorch pipeline only (use --data-backend pytorch)"
        )
    _check_values(values)


def _check_values(values: dict) -> None:
    from lars.tasks.barlowtwins import parse_projector

    try:
        parse_projector(values["projector"])
    except ValueError as error:
        raise SettingError(str(error)) from None
    checks = {
        "bt_lambda": 0.0,
        "norm_bias_lr": 0.0,
        "knn_every": 0,
        "knn_k": 1,
        "knn_bank": 1,
        "probe_epochs": 0,
        "probe_lr": 0.0,
        "probe_wd": 0.0,
        "probe_batch_size": 1,
    }
    for name, low in checks.items():
        value = values[name]
        if value is not None and not value >= low:
            raise SettingError(f"--{name.replace('_', '-')} must be >= {low:g}, got {value}")
    if values["norm_bias_lr"] is not None and not values["bn_bias_separately"]:
        raise SettingError(
            "--norm-bias-lr is the rate of the biases' and norms' group, which "
            "--no-bn-bias-separately merges into one: drop one of them"
        )
    path = values["probe_only"]
    if path is not None and not os.path.isfile(path):
        raise SettingError(f"--probe-only {path!r}: no such checkpoint file")
    if path is not None and values["probe_epochs"] == 0:
        raise SettingError("--probe-only with --probe-epochs 0: nothing to do")


def classification_identity(flat: dict) -> dict:
    """The task's settings leave a classification run's identity (fingerprint, log dir) as it
    was before `--task` existed."""
    if flat.get("task", "classification") != "classification":
        return flat
    return {k: v for k, v in flat.items() if k != "task" and k not in TASK_SETTINGS}
