"""The trainer's flags: `get_args_parser()` declares every one, grouped as `--help` shows them,
with units and defaults in the help. Defaults that depend on the dataset or the optimizer are
None here and decided in one place, `lars.config.resolve`.
"""

from __future__ import annotations

import argparse

from lars.factory import OPTIMIZER_SPECS, OPTIMIZERS
from lars.schedules import SCHEDULES
from lars.tasks.ssl_config import add_task_flags

DATASETS = ("imagefolder", "imagenet", "cifar10", "cifar100", "tinyimagenet")
DATA_BACKENDS = ("pytorch", "dali-cpu", "dali-gpu", "synthetic")  # lars.data.loaders.BACKENDS
_BASE_LR_HELP = ", ".join(f"{s.name} {s.base_lr:g}" for s in OPTIMIZER_SPECS.values())


def _data_flags(d) -> None:
    d.add_argument("--train-dir", help="ImageFolder root of the training set (default: sample set)")
    d.add_argument("--val-dir", help="ImageFolder root of the validation set")
    d.add_argument(
        "--dataset",
        choices=DATASETS,
        help="imagefolder (--train-dir/--val-dir); imagenet: ImageFolder trees of ImageNet-1k "
        "(a --dry-run needs none: 1,281,167 training images, 1,000 classes); or cifar10, "
        "cifar100, tinyimagenet read from their archives in --data-dir (default: imagefolder)",
    )
    d.add_argument(
        "--data-dir",
        help="folder holding cifar-10-python.tar.gz, "
        "cifar-100-python.tar.gz or tiny-imagenet-200.zip (or what they extract to)",
    )
    d.add_argument(
        "--val-crop-ratio",
        type=float,
        help="validation: resize to image-size / ratio, centre-crop image-size "
        "(0.875; 1.0 for the 32-64 px datasets)",
    )
    d.add_argument(
        "--synthetic",
        action="store_true",
        help="random tensors of ImageNet shape instead of files (throughput runs)",
    )
    d.add_argument("--image-size", type=int, help="training crop, pixels (224; sample set: 32)")
    d.add_argument(
        "--min-crop-scale",
        type=float,
        help="RandomResizedCrop's smallest area fraction (0.08; sample set: 0.35)",
    )
    d.add_argument(
        "--hflip",
        action=argparse.BooleanOptionalAction,
        help="random horizontal flips (on; off for the sample set's digits)",
    )
    d.add_argument(
        "--fast-jpeg",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ImageFolder JPEGs through the fast pipeline (crop box from the header, "
        "reduced-size decode, uint8 to the device); --no-fast-jpeg: torchvision's "
        "transforms (default: on)",
    )
    d.add_argument(
        "--data-backend",
        choices=DATA_BACKENDS,
        default="pytorch",
        help="pytorch (DataLoader workers), dali-cpu or dali-gpu (NVIDIA DALI pipelines), "
        "synthetic (random tensors) (default: pytorch)",
    )
    d.add_argument(
        "--train-images",
        type=int,
        metavar="N",
        help="with --dry-run: plan for a training set of N images without reading it "
        "(the data folders need not exist)",
    )
    d.add_argument(
        "--workers",
        type=int,
        help="data-loading processes per rank (default: CPU cores per rank - 1)",
    )


def _model_and_batch_flags(m) -> None:
    m.add_argument(
        "--model",
        help="torchvision model name, or resnet18_small/34/50 for 32-64 px, "
        "or tinycnn (resnet50; sample set: resnet18_small)",
    )
    m.add_argument("--epochs", type=int, help="epochs to train (90; sample set: 4)")
    m.add_argument("--batch-size", type=int, help="images per rank per micro-batch (32)")
    m.add_argument("--val-batch-size", type=int, help="images per rank per validation batch")
    m.add_argument(
        "--batches-per-allreduce",
        type=int,
        default=1,
        help="micro-batches accumulated per optimizer step; global batch = "
        "batch-size x ranks x this (default: 1)",
    )
    m.add_argument(
        "--max-steps",
        type=int,
        help="stop after this many optimizer steps (smoke runs, benchmarks)",
    )
    m.add_argument("--label-smoothing", type=float, help="label smoothing (0.1; sample set: 0)")


def _optimizer_flags(o) -> None:
    o.add_argument(
        "--base-op",
        "--optimizer",
        dest="base_op",
        default="lars",
        choices=OPTIMIZERS,
        help="optimizer (default: lars)",
    )
    o.add_argument(
        "--optimizer-variant",
        metavar="NAME",
        help="a published form of the optimizer's update: lars you2017|nus|barlowtwins, "
        "tvlars paper|authors, lamb you2020|nus|authors (default: the first, the paper's)",
    )
    o.add_argument(
        "--base-lr",
        type=float,
        help=f"learning rate for the reference batch ({_BASE_LR_HELP})",
    )
    o.add_argument(
        "--lr-scaling",
        choices=("keep", "linear", "sqrt"),
        help="lr = base-lr x 1, B/B0 or sqrt(B/B0) (default: keep; --task barlowtwins with "
        "lars: linear)",
    )
    o.add_argument(
        "--lr-reference-batch",
        type=int,
        default=256,
        help="B0 of --lr-scaling, images (default: 256)",
    )
    o.add_argument("--momentum", type=float, default=0.9, help="momentum (default: 0.9)")
    o.add_argument(
        "--wd",
        type=float,
        help="weight decay (default: 5e-5; --task barlowtwins with lars: 1.5e-6)",
    )
    o.add_argument(
        "--bn-bias-separately",
        action=argparse.BooleanOptionalAction,
        help="no weight decay and no layer adaptation for biases, normalisation parameters "
        "and other vectors (default: on for lars, tvlars and lamb, as their papers "
        "recommend; off for the others; --no-bn-bias-separately: one group)",
    )
    o.add_argument(
        "--trust-coefficient", type=float, default=0.001, help="LARS/TVLARS eta (default: 0.001)"
    )
    _tvlars_flags(o)


def _tvlars_flags(o) -> None:
    """TVLARS's phi(t) = 1 / (alpha + exp(lmbda (t - d_e))) + gamma_min (lars.plan resolves
    the defaults of lmbda and d_e from the run's length)."""
    o.add_argument(
        "--lmbda",
        type=float,
        help="TVLARS decay coefficient lambda, per optimizer step (default: from the run's "
        "length, see --tv-delay-epochs; 0.001, the authors' value, when only "
        "--tv-delay-epochs is given)",
    )
    o.add_argument(
        "--tv-alpha",
        type=float,
        help="TVLARS alpha (default: the variant's, 1 for paper, 0.1 for authors)",
    )
    o.add_argument(
        "--tv-delay-epochs",
        type=float,
        help="TVLARS delay d_e, epochs: phi(d_e) = 1 / (alpha + 1) (default, with --lmbda "
        "unset too: phi >= 0.99 for the first 10%% of the steps, 0.5 at 55%%, 0.01 at the "
        "end, at any batch size and length; 0 when only --lmbda is given)",
    )
    o.add_argument(
        "--tv-min-scale",
        type=float,
        default=0.0,
        help="TVLARS gamma_min, the floor of phi (default: 0)",
    )


def _schedule_flags(s) -> None:
    s.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help="poly (default), cosine, step (x0.1 at 30/60/80 epochs), constant; "
        "tvlars: none (phi is its schedule)",
    )
    s.add_argument(
        "--warmup-epochs",
        type=float,
        help="linear warm-up from 0, epochs, may be fractional (5; sample set: 0.5)",
    )
    s.add_argument(
        "--lr-power",
        type=float,
        help="power of the polynomial decay (2 for lars/tvlars, 1 otherwise, as in the seed)",
    )
    s.add_argument(
        "--end-lr",
        type=float,
        help="final learning rate (default: 0; --task barlowtwins with lars: 0.001 x the peak)",
    )


def _hardware_flags(h) -> None:
    h.add_argument(
        "--backend",
        choices=("auto", "horovod", "torch"),
        default="auto",
        help="horovod, or torch.distributed with DDP; auto: horovod when installed (default: auto)",
    )
    h.add_argument("--fp16-allreduce", action="store_true", help="compress gradients to fp16")
    h.add_argument("--use-adasum", action="store_true", help="Adasum instead of averaging")
    h.add_argument("--no-cuda", action="store_true", help="train on the CPU even with a GPU")
    h.add_argument(
        "--amp",
        choices=("none", "bf16", "fp16"),
        default="none",
        help="mixed precision: bf16, or fp16 with a gradient scaler (default: none)",
    )
    h.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="NHWC memory format (default: on with CUDA, off on the CPU)",
    )
    h.add_argument("--compile", action="store_true", help="torch.compile the model")
    h.add_argument(
        "--clip-grad-norm",
        type=float,
        help="clip the averaged gradients to this global L2 norm (default: off)",
    )
    h.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads per rank (default: CPU cores / ranks on the node)",
    )


def _planning_flags(c) -> None:
    c.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="YAML file of defaults (keys are long option names, with dashes or "
        "underscores); flags on the command line override it",
    )
    c.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (global batch, scaled LR, steps, warm-up, LR at a few "
        "points, parameters per group) and exit without training",
    )
    c.add_argument(
        "--ranks",
        type=int,
        help="with --dry-run: plan for this many ranks (default: this launch's)",
    )


def _run_flags(r) -> None:
    r.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    r.add_argument(
        "--log-dir",
        help="TensorBoard, config and checkpoint folder (default: runs/<dataset>-<model>-"
        "<optimizer>-gb<global batch>-<fingerprint>, the fingerprint's first 8 hex digits: "
        "each set of settings gets its own folder)",
    )
    r.add_argument(
        "--log-interval",
        type=int,
        default=10,
        help="optimizer steps between train logs (default: 10)",
    )
    r.add_argument(
        "--progress",
        choices=("auto", "bar", "log"),
        default="auto",
        help="bar: a live progress bar; log: periodic lines only; auto: the bar on "
        "a terminal outside mpirun/srun (default: auto)",
    )
    r.add_argument(
        "--resume",
        default="auto",
        help="auto (newest checkpoint in --log-dir), none, or a checkpoint path; a checkpoint "
        "made with other settings is refused, naming them (see --allow-change)",
    )
    r.add_argument(
        "--allow-change",
        metavar="SETTING[,SETTING...]",
        help="settings that may differ from the checkpoint's when resuming, as flag names "
        "(e.g. epochs,base-lr): the new values apply from the resumed step (a longer "
        "--epochs re-plans the schedule) and the change is recorded with its step in "
        "config.json and TensorBoard",
    )
    r.add_argument(
        "--evaluate",
        action="store_true",
        help="score the checkpoint --resume names (auto: the newest in --log-dir) on the "
        "validation set, on any number of ranks, write evaluation-<step>.json to --log-dir "
        "and train nothing",
    )
    r.add_argument(
        "--keep-checkpoints", type=int, default=3, help="checkpoints kept in --log-dir (default: 3)"
    )
    r.add_argument(
        "--checkpoint-every-steps",
        type=int,
        help="also checkpoint every this many optimizer steps (default: epoch ends)",
    )
    r.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels: a resumed run ends bitwise equal to an "
        "uninterrupted one (slower on GPU)",
    )


def _fault_tolerance_flags(f) -> None:
    f.add_argument(
        "--nonfinite",
        choices=("skip", "abort"),
        help="on a non-finite gradient: skip the step (count it) or abort with a "
        "checkpoint of the last good state (default: skip)",
    )
    f.add_argument(
        "--max-nonfinite",
        type=int,
        help="abort after this many non-finite steps in a row (default: 20; --nonfinite abort: 1)",
    )
    f.add_argument(
        "--strict-data",
        action="store_true",
        help="an unreadable image file stops the run (default: skip and count it)",
    )
    f.add_argument(
        "--stall-timeout",
        type=float,
        default=300.0,
        help="seconds a rank may stop taking part before Horovod ends the job (default: 300)",
    )


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
    ):
        add_flags(p.add_argument_group(title))
    return p
