"""What a run has done so far, and what of it a checkpoint holds.

A checkpoint payload is this state's counters plus the model, optimizer, LR schedule, AMP scaler
and RNG states (`lars.train.save`). Checkpoints written before `last_validation` was named so
hold it under "final"; they still load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lars.errors import ResumeError


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken ("global_step" in the payload)
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0  # not saved: a resumed run starts a new streak
    last_validation: dict | None = None  # {"epoch", "step", "loss", "top1", "top5", "samples"}
    # Settings changed mid-run with --allow-change: [{"step", "setting", "old", "new"}], oldest
    # first; `changed_now` holds this start's, to report (not saved twice).
    changes: list = field(default_factory=list)
    changed_now: list = field(default_factory=list, compare=False)
    # A task with a second stage (--task barlowtwins: "probe", lars.tasks.ssl_run): its epochs
    # and batches done, and its tensors ({"head", "optimizer", "scheduler"}) when saved.
    stage: str = "train"
    probe_epoch: int = 0
    probe_batches: int = 0
    probe: dict | None = None

    @property
    def log_step(self) -> int:
        """The x of TensorBoard and of checkpoint names: optimizer steps, then probe epochs."""
        return self.step + self.probe_epoch

    def step_in_epoch(self, plan) -> int:
        return self.step - self.epoch * plan.steps_per_epoch

    def to_payload(self, plan) -> dict:
        return {
            "epoch": self.epoch,
            "global_step": self.step,
            "step_in_epoch": self.step_in_epoch(plan),
            "global_batch_size": plan.global_batch_size,
            "last_validation": self.last_validation,
            "nonfinite_steps": self.nonfinite_total,
            "changes": list(self.changes),
            **({} if self.stage == "train" else self._stage_payload()),
        }

    def _stage_payload(self) -> dict:
        keys = ("stage", "probe_epoch", "probe_batches", "probe")
        return {key: getattr(self, key) for key in keys}

    @classmethod
    def from_payload(cls, payload: dict, plan) -> TrainState:
        """The state a checkpoint holds; ResumeError when it cannot continue under `plan`."""
        if payload["global_batch_size"] != plan.global_batch_size:
            raise ResumeError(
                f"--resume: the checkpoint was made with global batch "
                f"{payload['global_batch_size']}, this run has {plan.global_batch_size}; "
                "use the same batch size, ranks and --batches-per-allreduce (or --resume none)"
            )
        return cls(
            epoch=payload["epoch"],
            step=payload["global_step"],
            nonfinite_total=payload.get("nonfinite_steps", 0),
            last_validation=payload.get("last_validation", payload.get("final")),
            changes=list(payload.get("changes", [])),
            stage=payload.get("stage", "train"),
            probe_epoch=payload.get("probe_epoch", 0),
            probe_batches=payload.get("probe_batches", 0),
            probe=payload.get("probe"),
        )
