"""A run's settings: frozen, resolved once by `lars.config` (every default decided there).

Field names are the flags' argparse names, so `Settings.from_flat` and `Settings.flat` convert
to and from the flat mapping that config.json, TensorBoard's hparams and (later) a run
fingerprint record; a new flag is one field here and one `add_argument` in `lars.config`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class DataSettings:
    dataset: str  # sample, imagefolder, synthetic, cifar10, cifar100, tinyimagenet
    train_dir: str | None
    val_dir: str | None
    data_dir: str | None
    synthetic: bool
    image_size: int
    min_crop_scale: float
    hflip: bool
    val_crop_ratio: float
    fast_jpeg: bool
    data_backend: str  # pytorch, dali-cpu, dali-gpu, synthetic
    workers: int
    strict_data: bool


@dataclass(frozen=True)
class ModelSettings:
    model: str
    label_smoothing: float
    amp: str  # none, bf16, fp16
    channels_last: bool
    compile: bool


@dataclass(frozen=True)
class BatchSettings:
    batch_size: int  # per rank per micro-batch
    val_batch_size: int
    batches_per_allreduce: int  # read by lars.plan.plan_run only
    ranks: int | None  # --dry-run: plan for this many ranks


@dataclass(frozen=True)
class OptimizerSettings:
    base_op: str
    base_lr: float
    lr_scaling: str
    lr_reference_batch: int
    momentum: float
    wd: float
    bn_bias_separately: bool
    trust_coefficient: float
    lmbda: float
    tv_alpha: float
    tv_delay_epochs: float
    tv_min_scale: float
    clip_grad_norm: float | None


@dataclass(frozen=True)
class ScheduleSettings:
    epochs: int
    max_steps: int | None
    schedule: str
    warmup_epochs: float
    lr_power: float
    end_lr: float


@dataclass(frozen=True)
class HardwareSettings:
    backend: str
    fp16_allreduce: bool
    use_adasum: bool
    no_cuda: bool
    threads: int | None
    stall_timeout: float


@dataclass(frozen=True)
class RunSettings:
    seed: int
    log_dir: str
    log_interval: int
    progress: str
    resume: str
    keep_checkpoints: int
    checkpoint_every_steps: int | None
    deterministic: bool
    nonfinite: str
    max_nonfinite: int
    dry_run: bool
    config: str | None


@dataclass(frozen=True)
class Settings:
    data: DataSettings
    model: ModelSettings
    batch: BatchSettings
    optimizer: OptimizerSettings
    schedule: ScheduleSettings
    hardware: HardwareSettings
    run: RunSettings

    @classmethod
    def from_flat(cls, values: dict) -> Settings:
        """From {flag name: resolved value}; every flag must have exactly one home."""
        parts = {}
        for f in fields(cls):
            group = globals()[f.type] if isinstance(f.type, str) else f.type
            parts[f.name] = group(**{g.name: values[g.name] for g in fields(group)})
        homeless = set(values) - {k for part in parts.values() for k in asdict(part)}
        assert not homeless, f"flags without a settings field: {sorted(homeless)}"
        return cls(**parts)

    def flat(self) -> dict:
        """{flag name: value}, what config.json's "args" holds."""
        return {k: v for f in fields(self) for k, v in asdict(getattr(self, f.name)).items()}
