"""Continue a run from a checkpoint only when it is the same run, or the user said what changes.

A checkpoint records the settings it was made with (`config`) and the global batch; together they
are the run's identity (`lars.fingerprint`). Resuming compares them with this start's settings:

- every trajectory setting that differs and is not named in `--allow-change` is refused, all of
  them in one line with their old and new values (exit status 2);
- a named one is applied for real: the optimizer's hyper-parameters and the LR schedule are this
  start's (only the tensors of the optimizer state, the step count and the RNG states come from
  the checkpoint), so a longer `--epochs` re-plans the schedule from the resumed step on; the
  change is kept with its step in the train state (config.json, the checkpoint, TensorBoard).

A setting that an older checkpoint does not record ran at what this code does when it is not
given, so it is taken to be unchanged.
"""

from __future__ import annotations

from lars.checkpoint import find_resume_checkpoint, load_checkpoint, set_rng_states
from lars.errors import ResumeError
from lars.fingerprint import (
    FIXED_SETTINGS,
    differing_settings,
    format_value,
    refused_changes,
    run_identity,
)
from lars.state import TrainState

# ClosedFormLR's state that is the schedule itself (this start's), not its position.
_POSITION_KEYS = ("last_epoch", "_step_count")


def setting_name(key: str) -> str:
    """The flag a setting comes from ('--base-lr'), or what it is ('the global batch')."""
    if key == "global_batch_size":
        return "the global batch"
    return "--" + key.replace("_", "-")


def identity(settings, plan) -> dict:
    return run_identity(settings.flat(), plan.global_batch_size)


def choose_checkpoint(settings, dist) -> dict | None:
    """Rank 0 finds the checkpoint --resume names and broadcasts its contents (None: none)."""
    choice, payload = settings.run.resume, None
    if dist.rank == 0 and choice != "none":
        if choice == "auto":
            found = find_resume_checkpoint(settings.run.log_dir)
            payload = {**found[1], "path": str(found[0])} if found else None
        else:
            try:
                payload = {**load_checkpoint(choice), "path": str(choice)}
            except ValueError as error:
                payload = {"error": str(error)}
    payload = dist.broadcast_object(payload)
    if payload is not None and "error" in payload:
        raise ResumeError(f"--resume: {payload['error']}")
    return payload


def allowed_differences(settings, plan, payload: dict, ignore=()) -> list[tuple]:
    """The differences --allow-change names; ResumeError naming every other one (but those in
    `ignore`)."""
    old = run_identity(payload.get("config", {}), payload["global_batch_size"])
    new = identity(settings, plan)
    unknown_then = {key: value for key, value in new.items() if key not in old}
    diffs = differing_settings(old, new, defaults=unknown_then, exclude=ignore)
    refused, allowed = refused_changes(diffs, settings.run.allow_change)
    if refused:
        shown = []
        for key, before, after in refused:
            fixed = f" (fixed: {FIXED_SETTINGS[key]})" if key in FIXED_SETTINGS else ""
            shown.append(
                f"{setting_name(key)} {format_value(before)} -> {format_value(after)}{fixed}"
            )
        names = ",".join(k.replace("_", "-") for k, _, _ in refused if k not in FIXED_SETTINGS)
        allow = f" name the changes with --allow-change {names}, or" if names else ""
        raise ResumeError(
            f"--resume: the checkpoint {payload.get('path', '')} (step {payload['global_step']}) "
            f"was made with other settings: {', '.join(shown)}; to continue it, use its "
            f"values or{allow} start afresh with --resume none (or another --log-dir)"
        )
    return allowed


def restore(payload: dict, model, optimizer, scheduler, scaler) -> None:
    """Load the checkpoint's tensors and positions; keep this start's hyper-parameters and
    schedule (equal to the checkpoint's unless --allow-change let them differ)."""
    fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    fresh_schedule = scheduler.state_dict()
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])  # also restores the saved hyper-parameters
    for group, fresh in zip(optimizer.param_groups, fresh_groups):
        group.update(fresh)
    saved = payload["scheduler"]
    scheduler.load_state_dict({**fresh_schedule, **{k: saved[k] for k in _POSITION_KEYS}})
    rates = scheduler.get_lr()  # closed form: the rate of this step under this schedule
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports (torch keeps it there)
    if scaler is not None and payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])
    set_rng_states(payload["rng"])


def resume(settings, dist, plan, model, optimizer, scheduler, scaler) -> TrainState:
    """The state to continue from: a fresh one, or the checkpoint's (checked, then restored)."""
    payload = choose_checkpoint(settings, dist)
    if payload is None:
        return TrainState()
    allowed = allowed_differences(settings, plan, payload)
    state = TrainState.from_payload(payload, plan)
    restore(payload, model, optimizer, scheduler, scaler)
    state.changed_now = [
        {"step": state.step, "setting": key, "old": before, "new": after}
        for key, before, after in allowed
    ]
    state.changes += state.changed_now
    return state
