"""The adaptive batch's flags, their checks and the plan's description of the policy.

`add_flags` declares the group (`lars.flags` calls it); `check_flags` is called by
`lars.checks.check_flags` on the resolved values and raises SettingError naming the flag (exit
status 2); `describe` is what `--dry-run` and the run's start-up print. Names follow AdAdaGrad's
reference code where it has them (--test-type, --eta, --theta, --nu, --test-interval,
--max-batch-size, --max-micro-batch-size).
"""

from __future__ import annotations

import math

from lars.errors import SettingError

TEST_TYPES = ("none", "norm", "ip", "ip+orth")  # lars.adaptive.statistics.TEST_TYPES
ESTIMATORS = ("micro-batch", "per-sample")
INNER_PRODUCTS = ("copy", "previous")
GROWTH_ORDERS = ("accumulation", "micro-batch")
LR_POLICIES = ("none", "sqrt", "linear", "adascale")


def add_flags(a) -> None:
    a.add_argument(
        "--test-type",
        choices=TEST_TYPES,
        default="none",
        help="grow the global batch when a test on the gradient says it is too noisy "
        "(AdAdaGrad): norm (Byrd et al. 2012), ip (inner product, Bollapragada et al. 2018), "
        "ip+orth (augmented inner product); none: a fixed batch (default: none)",
    )
    for name, what in (("eta", "norm"), ("theta", "inner-product"), ("nu", "orthogonality")):
        a.add_argument(
            f"--{name}", type=float, default=0.1, help=f"the {what} test's tolerance (default: 0.1)"
        )
    a.add_argument(
        "--test-interval",
        type=int,
        default=1,
        help="optimizer steps between two tests (default: 1)",
    )
    a.add_argument(
        "--max-batch-size",
        type=int,
        help="the largest global batch the test may grow to (needed with --test-type)",
    )
    a.add_argument(
        "--max-micro-batch-size",
        type=int,
        help="the largest per-rank micro-batch (what fits memory; default: --batch-size)",
    )
    a.add_argument(
        "--max-batches-per-allreduce",
        type=int,
        help="where accumulation stops growing and the micro-batch starts (default: no limit)",
    )
    a.add_argument(
        "--batch-growth-order",
        choices=GROWTH_ORDERS,
        default="accumulation",
        help="what grows first: accumulation (batches per allreduce, then the micro-batch) or "
        "micro-batch (the reference's order) (default: accumulation)",
    )
    a.add_argument(
        "--batch-test-estimator",
        choices=ESTIMATORS,
        default="micro-batch",
        help="micro-batch: the ranks x batches-per-allreduce micro-batch gradients the step "
        "computes anyway (needs >= 2 of them); per-sample: torch.func per-sample gradients "
        "(the reference's; costly) (default: micro-batch)",
    )
    a.add_argument(
        "--batch-test-inner-products",
        choices=INNER_PRODUCTS,
        default="copy",
        help="micro-batch estimator, ip tests: copy (exact: keeps k gradient copies) or "
        "previous (dots with the last test's mean gradient) (default: copy)",
    )
    a.add_argument(
        "--per-sample-samples",
        type=int,
        default=64,
        help="per-sample estimator: samples per rank per test (default: 64)",
    )
    a.add_argument(
        "--per-sample-chunk",
        type=int,
        default=16,
        help="per-sample estimator: per-sample gradients computed at once (default: 16)",
    )
    a.add_argument(
        "--batch-test-ema",
        type=float,
        default=0.0,
        help="EMA factor in [0, 1) smoothing the test's numerator and denominator "
        "separately (default: 0, no smoothing)",
    )
    a.add_argument(
        "--batch-lr-policy",
        choices=LR_POLICIES,
        default="none",
        help="the LR when the batch grows from B0 to B: none (the paper's), sqrt (x sqrt(B/B0)), "
        "linear (x B/B0), adascale (AdaScale's gain ratio) (default: none)",
    )


def _positive(values: dict, names) -> None:
    for name in names:
        value = values[name]
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise SettingError(f"--{name.replace('_', '-')} must be > 0, got {value:g}")


def check_flags(values: dict, world_size: int) -> None:
    """SettingError naming the flag for a value or combination that cannot work."""
    if values.get("test_type", "none") == "none":
        return
    _positive(values, ("eta", "theta", "nu"))
    _positive(values, ("test_interval", "per_sample_samples", "per_sample_chunk"))
    _positive(values, ("max_micro_batch_size", "max_batches_per_allreduce"))
    if not 0.0 <= values["batch_test_ema"] < 1.0:
        raise SettingError(f"--batch-test-ema must be in [0, 1), got {values['batch_test_ema']:g}")
    if values["max_batch_size"] is None:
        raise SettingError(f"--test-type {values['test_type']} needs --max-batch-size")
    from lars.adaptive.policy import BatchGrowth

    micro, k = values["batch_size"], values["batches_per_allreduce"]
    try:
        growth(values, world_size, BatchGrowth).check(micro, k)
    except ValueError as error:
        raise SettingError(str(error)) from None
    if values["batch_test_estimator"] == "micro-batch" and world_size * k < 2:
        raise SettingError(
            f"--batch-test-estimator micro-batch needs ranks x --batches-per-allreduce >= 2 "
            f"(here {world_size} x {k}): use --batches-per-allreduce 2 or more, or "
            "--batch-test-estimator per-sample"
        )
    grows_micro = (values["max_micro_batch_size"] or micro) > micro
    if grows_micro and values["data_backend"].startswith("dali"):
        raise SettingError(
            f"--max-micro-batch-size with --data-backend {values['data_backend']}: DALI's "
            "pipelines have a fixed batch; grow only batches per allreduce"
        )
    if values.get("task", "classification") != "classification":
        raise SettingError(
            f"--test-type with --task {values['task']}: the adaptive batch is built for the "
            "classification step only"
        )
    if values["use_adasum"]:
        raise SettingError("--test-type with --use-adasum: Adasum has no averaged gradient to test")


def growth(values: dict, world_size: int, cls):
    """The `BatchGrowth` caps of these flag values."""
    return cls(
        world_size=world_size,
        max_batch=values["max_batch_size"],
        max_micro_batch=values["max_micro_batch_size"] or values["batch_size"],
        max_batches_per_allreduce=values["max_batches_per_allreduce"],
        order=values["batch_growth_order"],
    )


def describe(a, plan) -> list[str]:
    """The policy in words (`a` the adaptive settings, `plan` the start's): what --dry-run and
    the start of a run print."""
    start_batch, micro = plan.global_batch_size, a.max_micro_batch_size or plan.micro_batch
    if a.test_type == "none":
        return []
    tolerance = {"norm": f"eta {a.eta:g}", "ip": f"theta {a.theta:g}"}.get(
        a.test_type, f"theta {a.theta:g}, nu {a.nu:g}"
    )
    estimator = a.batch_test_estimator
    if estimator == "per-sample":
        estimator += f" ({a.per_sample_samples} samples per rank, {a.per_sample_chunk} at a time)"
    elif a.test_type != "norm":
        estimator += f" (inner products: {a.batch_test_inner_products})"
    k_cap = a.max_batches_per_allreduce or "no limit"
    ema = f"EMA {a.batch_test_ema:g}" if a.batch_test_ema else "no smoothing"
    return [
        f"adaptive batch     {a.test_type} test ({tolerance}) every {a.test_interval} step(s), "
        f"{estimator}, {ema}",
        f"  grows            from {start_batch} to at most {a.max_batch_size}, never shrinks: "
        f"{a.batch_growth_order} first; caps: micro-batch {micro} per rank, "
        f"batches per allreduce {k_cap}, {plan.world_size} rank(s)",
        f"  lr policy        {a.batch_lr_policy}; the schedule (warm-up, decay, TVLARS's t) "
        f"runs in samples / {start_batch}, the epochs budget in samples",
    ]
