"""The second stage of `--task barlowtwins`: the linear probe, resumable by (epoch, batch).

Zbontar et al. 2021's linear evaluation (`lars.tasks.linear_probe`): the backbone frozen in eval
mode, a linear head trained with SGD and a per-epoch cosine, random crops for training, centre
crops for validation, whole-set top-1/top-5. Here it runs inside the trainer's run: after every
probe epoch the run is checkpointed with the head, its optimizer and schedule (`TrainState.probe`),
a signal stops every rank after the same batch (the shared `StopAgreement`), and TensorBoard gets
`linear/train_loss`, `linear/train_top1`, `linear/lr` per epoch at x = pre-training steps + probe
epochs (`TrainState.log_step`), then `linear/top1`, `linear/top5` and `hparam/linear_top1`.
"""

from __future__ import annotations

import copy
import time

import torch

from lars.faults import StopAgreement, Watchdog
from lars.train import preempted, save

__all__ = ["probe_stage"]


def _backbone(backbone, compat: bool):
    """The model's own backbone (eval mode), or for --bt-compat tvlars a copy run in training
    mode with per-rank BatchNorm (no collective in a forward whose count differs by rank)."""
    from lars.tasks.bt_loss import local_batchnorm

    return local_batchnorm(copy.deepcopy(backbone)) if compat else backbone


def _build(task, config):
    """(probe, optimizer, scheduler), the head drawn from --seed (the same on every start), then
    the checkpoint's tensors if the probe had begun."""
    from lars.tasks.linear_probe import build_probe

    parts, state = task.parts, task.state
    backbone = _backbone(parts.model.backbone, not config.backbone_eval_mode)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(task.settings.run.seed)
        probe, optimizer, scheduler = build_probe(
            backbone, parts.model.feature_width, parts.data.num_classes, config
        )
    probe.head.to(parts.device)
    if state.probe is not None:
        probe.head.load_state_dict(state.probe["head"])
        optimizer.load_state_dict(state.probe["optimizer"])
        scheduler.load_state_dict(state.probe["scheduler"])
    return probe, optimizer, scheduler


def _save(parts, state, probe, optimizer, scheduler) -> None:
    """Checkpoint the run with the probe's tensors (collective, as `lars.train.save`)."""
    state.probe = {
        "head": probe.head.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    save(parts, state)


def _train(task, config, probe, optimizer, scheduler) -> None:
    """Probe epochs from the state's (epoch, batch) to the last; Preempted on a signal."""
    from lars.tasks.linear_probe import train_probe_epoch

    parts, state = task.parts, task.state
    train_loader, sampler, _ = task.loaders
    where = lambda: f"on rank {parts.dist.rank} in probe epoch {state.probe_epoch + 1}"  # noqa: E731
    watchdog = Watchdog(task.settings.hardware.stall_timeout, where)
    stop = StopAgreement(parts.dist, parts.preemption)
    if stop.after_step():  # a signal during start-up: every rank stops before the first batch
        raise preempted(parts, state, saved=False)

    def after_batch() -> bool:
        state.probe_batches += 1
        watchdog.kick()
        return stop.after_step()

    watchdog.start()
    try:
        for epoch in range(state.probe_epoch, config.epochs):
            sampler.set_epoch(epoch)
            sampler.skip_samples = state.probe_batches * task.settings.task.probe_batch_size
            lr = optimizer.param_groups[0]["lr"]
            metrics = train_probe_epoch(
                probe, optimizer, train_loader, parts.dist, parts.device, after_batch=after_batch
            )
            if metrics["stopped"]:
                stop.drain()
                _save(parts, state, probe, optimizer, scheduler)
                raise preempted(parts, state, saved=True)
            scheduler.step()
            state.probe_epoch, state.probe_batches = epoch + 1, 0
            tags = {"linear/train_loss": metrics["loss"], "linear/train_top1": metrics["top1"]}
            parts.reporter.scalars({**tags, "linear/lr": lr}, state.log_step)
            parts.reporter.print(
                f"probe epoch {epoch + 1}/{config.epochs}: loss {metrics['loss']:.4f} "
                f"top1 {metrics['top1']:.2f}% lr {lr:.5g}"
            )
            _save(parts, state, probe, optimizer, scheduler)
        stop.drain()
    finally:
        watchdog.stop()


def probe_stage(task) -> dict:
    """Train (or finish training) the probe, then score it on the whole validation set."""
    from lars.tasks.linear_probe import evaluate_probe
    from lars.tasks.ssl_run import probe_config

    parts, state, settings = task.parts, task.state, task.settings
    config = probe_config(settings.task)
    if state.stage != "probe":
        state.stage, state.probe_epoch, state.probe_batches, state.probe = "probe", 0, 0, None
    elif state.probe_epoch or state.probe_batches:
        parts.reporter.print(
            f"linear probe resumed at epoch {state.probe_epoch + 1}, batch {state.probe_batches}"
        )
    probe, optimizer, scheduler = _build(task, config)
    task.loaders = task.probe_loaders(config)
    started = time.perf_counter()
    _train(task, config, probe, optimizer, scheduler)
    final = evaluate_probe(probe, task.loaders[2], parts.dist, parts.device)
    parts.reporter.scalars(
        {"linear/top1": final["top1"], "linear/top5": final["top5"]}, state.log_step
    )
    knn = (state.last_validation or {}).get("knn_top1")
    metrics = {"hparam/linear_top1": final["top1"], "hparam/linear_top5": final["top5"]}
    if knn is not None:
        metrics["hparam/knn_top1"] = knn
    hidden = ("log_dir", "resume", "train_dir", "val_dir", "data_dir", "probe_only")
    parts.reporter.hparams({k: v for k, v in settings.flat().items() if k not in hidden}, metrics)
    parts.reporter.print(
        f"done: linear probe top1 {final['top1']:.2f}% top5 {final['top5']:.2f}% "
        f"({final['samples']} images) after {config.epochs} epochs in "
        f"{time.perf_counter() - started:.1f} s"
        + (f"; k-NN top1 {knn:.2f}%" if knn is not None else "")
    )
    return {**final, "knn_top1": knn}
