"""A run's settings: frozen, resolved once by `lars.config` (every default is decided there).

Each group is a frozen dataclass whose fields are flags' argparse names (their meaning, units and
defaults are in each flag's help). `Settings.from_flat` and `Settings.flat` convert to and from
the flat {flag: value} mapping that config.json, TensorBoard's hparams and a run fingerprint
record; a new flag is one row in `lars.flags` and one name below.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, make_dataclass

from lars.tasks.ssl_config import TASK_SETTINGS

GROUPS = {
    "data": "dataset train_dir val_dir data_dir synthetic image_size min_crop_scale hflip "
    "val_crop_ratio fast_jpeg data_backend workers strict_data train_images",
    "model": "model label_smoothing amp channels_last compile",
    # batches_per_allreduce and batch_size are read by lars.plan.plan_run only
    "batch": "batch_size val_batch_size batches_per_allreduce ranks",
    "optimizer": "base_op optimizer_variant base_lr lr_scaling lr_reference_batch momentum wd "
    "bn_bias_separately trust_coefficient lmbda tv_alpha tv_delay_epochs tv_min_scale "
    "clip_grad_norm",
    "schedule": "epochs max_steps max_samples schedule warmup_epochs lr_power end_lr",
    "hardware": "backend fp16_allreduce use_adasum no_cuda threads stall_timeout",
    "run": "seed log_dir log_interval progress resume keep_checkpoints checkpoint_every_steps "
    "deterministic nonfinite max_nonfinite dry_run config allow_change evaluate",
    "task": " ".join(["task", *TASK_SETTINGS]),
    # the adaptive batch (lars.adaptive.flags); with test_type none, not part of the identity
    "adaptive": "test_type eta theta nu test_interval max_batch_size max_micro_batch_size "
    "max_batches_per_allreduce batch_growth_order batch_test_estimator batch_test_inner_products "
    "per_sample_samples per_sample_chunk batch_test_ema batch_lr_policy",
}
GROUP_CLASSES = {
    group: make_dataclass(f"{group.title()}Settings", names.split(), frozen=True)
    for group, names in GROUPS.items()
}
DataSettings, ModelSettings, BatchSettings, OptimizerSettings = list(GROUP_CLASSES.values())[:4]
ScheduleSettings, HardwareSettings, RunSettings, TaskSettings, AdaptiveSettings = list(
    GROUP_CLASSES.values()
)[4:]


@dataclass(frozen=True)
class Settings:
    data: DataSettings
    model: ModelSettings
    batch: BatchSettings
    optimizer: OptimizerSettings
    schedule: ScheduleSettings
    hardware: HardwareSettings
    run: RunSettings
    task: TaskSettings
    adaptive: AdaptiveSettings

    @classmethod
    def from_flat(cls, values: dict) -> Settings:
        """From {flag name: resolved value}; every flag must have exactly one home."""
        homeless = set(values) - {name for names in GROUPS.values() for name in names.split()}
        assert not homeless, f"flags without a settings field: {sorted(homeless)}"
        groups = GROUP_CLASSES.items()
        return cls(**{g: c(**{f.name: values[f.name] for f in fields(c)}) for g, c in groups})

    def flat(self) -> dict:
        """{flag name: value}, what config.json's "args" holds."""
        return {k: v for f in fields(self) for k, v in asdict(getattr(self, f.name)).items()}
