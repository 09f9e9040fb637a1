"""The trainer's flags: `get_args_parser()` declares every one, grouped as `--help` shows them,
with units and defaults in the help. Defaults that depend on the dataset or the optimizer are
None here and decided in one place, `lars.config.resolve`.

A group is a function that adds its flags to an argparse group; most are tables made by `_rows`,
one row per flag: (names, space-separated; argparse options; help).
"""

from __future__ import annotations

import argparse

from lars.adaptive.flags import add_flags as add_adaptive_batch_flags
from lars.factory import OPTIMIZER_SPECS, OPTIMIZERS
from lars.schedules import SCHEDULES
from lars.tasks.ssl_config import add_task_flags

DATASETS = ("imagefolder", "imagenet", "cifar10", "cifar100", "tinyimagenet")
DATA_BACKENDS = ("pytorch", "dali-cpu", "dali-gpu", "synthetic")  # lars.data.loaders.BACKENDS
_BASE_LR_HELP = ", ".join(f"{s.name} {s.base_lr:g}" for s in OPTIMIZER_SPECS.values())
INT, FLOAT, SWITCH = {"type": int}, {"type": float}, {"action": "store_true"}
ON_OFF = {"action": argparse.BooleanOptionalAction}


def _rows(*rows):
    """A flag-group function adding one flag per row of (names, argparse options, help)."""

    def add_flags(group) -> None:
        for names, options, help in rows:
            group.add_argument(*names.split(), **options, help=help)

    return add_flags


# The tables are aligned by hand (one row per flag, its help below when long): `fmt: off`.
# fmt: off
_data_flags = _rows(
    ("--train-dir", {}, "ImageFolder root of the training set (default: sample set)"),
    ("--val-dir", {}, "ImageFolder root of the validation set"),
    ("--dataset", {"choices": DATASETS},
        "imagefolder (--train-dir/--val-dir); imagenet: ImageFolder trees of ImageNet-1k "
        "(a --dry-run needs none: 1,281,167 training images, 1,000 classes); or cifar10, "
        "cifar100, tinyimagenet read from their archives in --data-dir (default: imagefolder)"),
    ("--data-dir", {}, "folder holding cifar-10-python.tar.gz, "
        "cifar-100-python.tar.gz or tiny-imagenet-200.zip (or what they extract to)"),
    ("--val-crop-ratio", FLOAT, "validation: resize to image-size / ratio, centre-crop "
        "image-size (0.875; 1.0 for the 32-64 px datasets)"),
    ("--synthetic", SWITCH, "random tensors of ImageNet shape instead of files (throughput runs)"),
    ("--image-size", INT, "training crop, pixels (224; sample set: 32)"),
    ("--min-crop-scale", FLOAT,
        "RandomResizedCrop's smallest area fraction (0.08; sample set: 0.35)"),
    ("--hflip", ON_OFF, "random horizontal flips (on; off for the sample set's digits)"),
    ("--fast-jpeg", {**ON_OFF, "default": True}, "ImageFolder JPEGs through the fast pipeline "
        "(crop box from the header, reduced-size decode, uint8 to the device); --no-fast-jpeg: "
        "torchvision's transforms (default: on)"),
    ("--data-backend", {"choices": DATA_BACKENDS, "default": "pytorch"},
        "pytorch (DataLoader workers), dali-cpu or dali-gpu (NVIDIA DALI pipelines), "
        "synthetic (random tensors) (default: pytorch)"),
    ("--train-images", {**INT, "metavar": "N"}, "with --dry-run: plan for a training set of N "
        "images without reading it (the data folders need not exist)"),
    ("--workers", INT, "data-loading processes per rank (default: CPU cores per rank - 1)"),
)
_model_and_batch_flags = _rows(
    ("--model", {}, "torchvision model name, or resnet18_small/34/50 for 32-64 px, "
        "or tinycnn (resnet50; sample set: resnet18_small)"),
    ("--epochs", INT, "epochs to train (90; sample set: 4)"),
    ("--batch-size", INT, "images per rank per micro-batch (32)"),
    ("--val-batch-size", INT, "images per rank per validation batch"),
    ("--batches-per-allreduce", {**INT, "default": 1}, "micro-batches accumulated per "
        "optimizer step; global batch = batch-size x ranks x this (default: 1)"),
    ("--max-steps", INT, "stop after this many optimizer steps (smoke runs, benchmarks)"),
    ("--max-samples", INT, "stop at the first step that brings the training samples seen to "
        "N or more (a budget that holds while the batch grows; --test-type)"),
    ("--label-smoothing", FLOAT, "label smoothing (0.1; sample set: 0)"),
)
# TVLARS's phi(t) = 1 / (alpha + exp(lmbda (t - d_e))) + gamma_min (lars.plan resolves the
# defaults of lmbda and d_e from the run's length).
_optimizer_flags = _rows(
    ("--base-op --optimizer", {"dest": "base_op", "default": "lars", "choices": OPTIMIZERS},
        "optimizer (default: lars)"),
    ("--optimizer-variant", {"metavar": "NAME"}, "a published form of the optimizer's update: "
        "lars you2017|nus|barlowtwins, tvlars paper|authors, lamb you2020|nus|authors "
        "(default: the first, the paper's)"),
    ("--base-lr", FLOAT, f"learning rate for the reference batch ({_BASE_LR_HELP})"),
    ("--lr-scaling", {"choices": ("keep", "linear", "sqrt")},
        "lr = base-lr x 1, B/B0 or sqrt(B/B0) (default: keep; --task barlowtwins with lars: "
        "linear)"),
    ("--lr-reference-batch", {**INT, "default": 256}, "B0 of --lr-scaling, images (default: 256)"),
    ("--momentum", {**FLOAT, "default": 0.9}, "momentum (default: 0.9)"),
    ("--wd", FLOAT, "weight decay (default: 5e-5; --task barlowtwins with lars: 1.5e-6)"),
    ("--bn-bias-separately", ON_OFF, "no weight decay and no layer adaptation for biases, "
        "normalisation parameters and other vectors (default: on for lars, tvlars and lamb, as "
        "their papers recommend; off for the others; --no-bn-bias-separately: one group)"),
    ("--trust-coefficient", {**FLOAT, "default": 0.001}, "LARS/TVLARS eta (default: 0.001)"),
    ("--lmbda", FLOAT, "TVLARS decay coefficient lambda, per optimizer step (default: from the "
        "run's length, see --tv-delay-epochs; 0.001, the authors' value, when only "
        "--tv-delay-epochs is given)"),
    ("--tv-alpha", FLOAT, "TVLARS alpha (default: the variant's, 1 for paper, 0.1 for authors)"),
    ("--tv-delay-epochs", FLOAT, "TVLARS delay d_e, epochs: phi(d_e) = 1 / (alpha + 1) "
        "(default, with --lmbda unset too: phi >= 0.99 for the first 10%% of the steps, 0.5 at "
        "55%%, 0.01 at the end, at any batch size and length; 0 when only --lmbda is given)"),
    ("--tv-min-scale", {**FLOAT, "default": 0.0},
        "TVLARS gamma_min, the floor of phi (default: 0)"),
)
_schedule_flags = _rows(
    ("--schedule", {"choices": SCHEDULES}, "poly (default), cosine, step (x0.1 at 30/60/80 "
        "epochs), constant; tvlars: none (phi is its schedule)"),
    ("--warmup-epochs", FLOAT,
        "linear warm-up from 0, epochs, may be fractional (5; sample set: 0.5)"),
    ("--lr-power", FLOAT,
        "power of the polynomial decay (2 for lars/tvlars, 1 otherwise, as in the seed)"),
    ("--end-lr", FLOAT,
        "final learning rate (default: 0; --task barlowtwins with lars: 0.001 x the peak)"),
)
_hardware_flags = _rows(
    ("--backend", {"choices": ("auto", "horovod", "torch"), "default": "auto"}, "horovod, or "
        "torch.distributed with DDP; auto: horovod when installed (default: auto)"),
    ("--fp16-allreduce", SWITCH, "compress gradients to fp16"),
    ("--use-adasum", SWITCH, "Adasum instead of averaging"),
    ("--no-cuda", SWITCH, "train on the CPU even with a GPU"),
    ("--amp", {"choices": ("none", "bf16", "fp16"), "default": "none"},
        "mixed precision: bf16, or fp16 with a gradient scaler (default: none)"),
    ("--channels-last", ON_OFF, "NHWC memory format (default: on with CUDA, off on the CPU)"),
    ("--compile", SWITCH, "torch.compile the model"),
    ("--clip-grad-norm", FLOAT,
        "clip the averaged gradients to this global L2 norm (default: off)"),
    ("--threads", INT, "torch CPU threads per rank (default: CPU cores / ranks on the node)"),
)
_planning_flags = _rows(
    ("--config", {"metavar": "FILE.yaml"}, "YAML file of defaults (keys are long option names, "
        "with dashes or underscores); flags on the command line override it"),
    ("--dry-run", SWITCH, "print the plan (global batch, scaled LR, steps, warm-up, LR at a "
        "few points, parameters per group) and exit without training"),
    ("--ranks", INT, "with --dry-run: plan for this many ranks (default: this launch's)"),
)
_run_flags = _rows(
    ("--seed", {**INT, "default": 42}, "random seed (default: 42)"),
    ("--log-dir", {}, "TensorBoard, config and checkpoint folder (default: runs/<dataset>-"
        "<model>-<optimizer>-gb<global batch>-<fingerprint>, the fingerprint's first 8 hex "
        "digits: each set of settings gets its own folder)"),
    ("--log-interval", {**INT, "default": 10}, "optimizer steps between train logs (default: 10)"),
    ("--progress", {"choices": ("auto", "bar", "log"), "default": "auto"}, "bar: a live "
        "progress bar; log: periodic lines only; auto: the bar on a terminal outside "
        "mpirun/srun (default: auto)"),
    ("--resume", {"default": "auto"}, "auto (newest checkpoint in --log-dir), none, or a "
        "checkpoint path; a checkpoint made with other settings is refused, naming them (see "
        "--allow-change)"),
    ("--allow-change", {"metavar": "SETTING[,SETTING...]"}, "settings that may differ from "
        "the checkpoint's when resuming, as flag names (e.g. epochs,base-lr): the new values "
        "apply from the resumed step (a longer --epochs re-plans the schedule) and the change "
        "is recorded with its step in config.json and TensorBoard"),
    ("--evaluate", SWITCH, "score the checkpoint --resume names (auto: the newest in "
        "--log-dir) on the validation set, on any number of ranks, write "
        "evaluation-<step>.json to --log-dir and train nothing"),
    ("--keep-checkpoints", {**INT, "default": 3}, "checkpoints kept in --log-dir (default: 3)"),
    ("--checkpoint-every-steps", INT,
        "also checkpoint every this many optimizer steps (default: epoch ends)"),
    ("--deterministic", SWITCH, "deterministic kernels: a resumed run ends bitwise equal to "
        "an uninterrupted one (slower on GPU)"),
)
_fault_tolerance_flags = _rows(
    ("--nonfinite", {"choices": ("skip", "abort")}, "on a non-finite gradient: skip the step "
        "(count it) or abort with a checkpoint of the last good state (default: skip)"),
    ("--max-nonfinite", INT, "abort after this many non-finite steps in a row "
        "(default: 20; --nonfinite abort: 1)"),
    ("--strict-data", SWITCH,
        "an unreadable image file stops the run (default: skip and count it)"),
    ("--stall-timeout", {**FLOAT, "default": 300.0},
        "seconds a rank may stop taking part before Horovod ends the job (default: 300)"),
)
# fmt: on


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pytorch_imagenet_resnet.py",
        description="Large-batch ImageNet training with LARS, TVLARS and LAMB on Horovod.",
        epilog="Without --train-dir the run uses the embedded sample dataset (built on first use).",
    )
    for title, add_flags in (
        ("data", _data_flags),
        ("model and batch", _model_and_batch_flags),
        ("optimizer", _optimizer_flags),
        ("learning-rate schedule", _schedule_flags),
        ("distributed and hardware", _hardware_flags),
        ("configuration files and planning", _planning_flags),
        ("run, logging and checkpoints", _run_flags),
        ("fault tolerance", _fault_tolerance_flags),
        ("task (self-supervised pre-training and linear evaluation)", add_task_flags),
        ("adaptive batch size (AdAdaGrad's tests)", add_adaptive_batch_flags),
    ):
        add_flags(p.add_argument_group(title))
    return p
