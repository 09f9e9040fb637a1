"""`--task barlowtwins`: pre-training through the shared loop, the k-NN monitor, the probe.

    run_barlow_twins(settings)
      build_run            lars.train's, with lars.build's task hooks (pairs, model, groups, loss)
      fit                  lars.train's loop and lars.step.optimizer_step, with the SSLMeter
                           (ssl/loss, ssl/on_diag, ssl/off_diag) and, every --knn-every epochs,
                           the k-NN monitor (ssl/knn_top1) in place of validation
      probe_stage          once pre-training reached its last step (or at once, --probe-only):
                           the linear probe (lars.tasks.linear_probe), --probe-epochs epochs,
                           checkpointed after each; then linear/top1 and linear/top5

`TrainState.stage` ("train", then "probe") and its probe counters are saved with every
checkpoint, so a run stopped in either stage (a signal: exit status 3) continues where it was
with the same command. A pre-training cut short by --max-steps stops there without a probe
(the probe belongs to the whole schedule); running on without --max-steps continues it.
The probe's data are seeded per (seed, probe epoch, index) like pre-training's, its head is
initialised from --seed, and its position is (epoch, batch), so resuming it is exact.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.data import DataLoader, Subset

from lars.errors import SettingError
from lars.metrics import average_batchnorm_statistics
from lars.reporting import describe, run_config
from lars.train import build_run, finish_epoch, fit

__all__ = ["BarlowTwinsRun", "probe_config", "run_barlow_twins", "task_lines"]


def probe_config(task):
    """The probe of the settings' task group (--bt-compat tvlars: the repository's quirks)."""
    from lars.tasks.linear_probe import ProbeConfig

    compat = task.bt_compat == "tvlars"
    return ProbeConfig(
        epochs=task.probe_epochs,
        lr=task.probe_lr,
        weight_decay=task.probe_wd,
        backbone_eval_mode=not compat,
        random_val_crops=compat,
    )


def task_lines(settings, feature_width: int, groups: list[dict]) -> list[str]:
    """What the run and --dry-run print about the task."""
    t = settings.task
    rates = ", ".join(
        f"{'weights' if g.get('layer_adaptation', True) else 'biases and norms'} "
        f"{g.get('initial_lr', g.get('lr', float('nan'))):.6g}"
        for g in groups
    )
    compat = (
        " (--bt-compat tvlars: the TVLARS repository's quirks)" if t.bt_compat != "none" else ""
    )
    knn = f"every {t.knn_every} epoch(s), k {t.knn_k}, bank {t.knn_bank}" if t.knn_every else "off"
    return [
        f"task               barlowtwins{compat}: {feature_width}-d features -> projector "
        f"{t.projector}, lambda {t.bt_lambda:g}",
        f"peak rates         {rates}",
        f"k-NN monitor       {knn}",
        f"linear probe       {t.probe_epochs} epochs after pre-training, SGD lr {t.probe_lr:g} "
        f"cosine, wd {t.probe_wd:g}, batch {t.probe_batch_size} per rank"
        + (f"; backbone from {t.probe_only}" if t.probe_only else ""),
    ]


class BarlowTwinsRun:
    """One run's task side: its extra loaders (k-NN bank, probe) and its two stages."""

    def __init__(self, parts, state) -> None:
        self.parts, self.state, self.settings = parts, state, parts.settings
        self._bank = None
        self.loaders = None  # the probe's (train, its sampler, val), made when it starts

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset, batch_size, sampler):
        from lars.data.fast import loader_settings
        from lars.data.loaders import RobustDataset, collate_skipping_bad

        data, cuda = self.settings.data, self.parts.device.type == "cuda"
        robust = RobustDataset(dataset, self.settings.run.seed, data.strict_data)
        sampler = sampler(robust) if callable(sampler) else sampler
        return DataLoader(
            robust,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_skipping_bad,
            **loader_settings(data.workers, cuda),
        )

    def bank_loader(self):
        """--knn-bank training images (a fixed subset drawn from --seed), validation crops."""
        from lars.data.loaders import ShardSampler, val_transform
        from lars.tasks.ssl_build import training_images

        if self._bank is None:
            data, dist = self.settings.data, self.parts.dist
            images = training_images(
                self.settings, val_transform(data.image_size, data.val_crop_ratio)
            )
            generator = torch.Generator().manual_seed(self.settings.run.seed)
            chosen = torch.randperm(len(images), generator=generator)[: self.settings.task.knn_bank]
            subset = Subset(images, sorted(chosen.tolist()))
            sampler = ShardSampler(len(subset), dist.rank, dist.size)
            self._bank = self._loader(subset, self.settings.batch.val_batch_size, sampler)
        return self._bank

    def probe_loaders(self, config):
        """(train loader, its EpochTaggedSampler, validation loader) of the probe."""
        from lars.data.loaders import EpochTaggedSampler, ShardSampler
        from lars.tasks.linear_probe import probe_transforms
        from lars.tasks.ssl_build import split_images, training_images

        s, dist = self.settings, self.parts.dist
        d = s.data
        train_tf, val_tf = probe_transforms(
            d.image_size, config, d.val_crop_ratio, d.min_crop_scale, d.hflip
        )
        sampler = functools.partial(
            EpochTaggedSampler, num_replicas=dist.size, rank=dist.rank, seed=s.run.seed
        )
        train = self._loader(training_images(s, train_tf), s.task.probe_batch_size, sampler)
        val = self.parts.data.val
        if config.random_val_crops:  # the TVLARS repository's test crops
            images = split_images(s, None, val_tf)[1]
            shard = ShardSampler(len(images), dist.rank, dist.size)
            val = self._loader(images, s.batch.val_batch_size, shard)
        return train, train.sampler, val

    # ------------------------------------------------------------------ pre-training
    def knn_check(self, parts, state):
        """The k-NN monitor every --knn-every epochs and at the last step (else None)."""
        from lars.tasks.knn import knn_top1

        every, epoch = self.settings.task.knn_every, state.epoch + 1
        if not every or (epoch % every and state.step < parts.plan.last_step):
            return None
        average_batchnorm_statistics(parts.model, parts.dist)  # the statistics a save keeps
        result = knn_top1(
            parts.model.backbone,
            self.bank_loader(),
            parts.data.val,
            parts.data.num_classes,
            parts.dist,
            parts.device,
            k=self.settings.task.knn_k,
        )
        parts.watchdog.kick()
        parts.reporter.scalars({"ssl/knn_top1": result["top1"]}, state.step)
        parts.reporter.print(
            f"epoch {epoch}: k-NN top-1 {result['top1']:.2f}% (k {self.settings.task.knn_k}, "
            f"bank {result['bank']}, {result['samples']} images)"
        )
        return {"knn_top1": result["top1"], "samples": result["samples"]}

    def pretraining_done(self, parts, state, seconds: float):
        last = state.last_validation or {}
        knn = f"; k-NN top-1 {last['knn_top1']:.2f}%" if "knn_top1" in last else ""
        skipped = f"; {state.nonfinite_total} non-finite step(s) skipped"
        parts.reporter.print(
            f"pre-training done: {state.step} steps in {seconds:.1f} s{knn}"
            + (skipped if state.nonfinite_total else "")
        )
        return last

    def pretrain(self):
        from lars.tasks.barlowtwins import SSLMeter

        parts, state = self.parts, self.state
        if state.step >= parts.plan.last_step:  # resumed after the last step: describe only
            return self.describe()
        fit(
            parts,
            state,
            end_epoch=functools.partial(finish_epoch, check=self.knn_check),
            meter=SSLMeter(parts.step.loss_fn, parts.device),
            finish=self.pretraining_done,
        )

    def load_probe_only(self):
        """--probe-only: the checkpoint's backbone, then straight to the probe."""
        from lars.tasks.ssl_build import probe_checkpoint_backbone

        path = self.settings.task.probe_only
        try:
            self.parts.model.backbone.load_state_dict(probe_checkpoint_backbone(path))
        except RuntimeError as error:
            first = str(error).splitlines()[0]
            raise SettingError(
                f"--probe-only {path!r}: its backbone is not a --model "
                f"{self.settings.model.model}: {first}"
            ) from None
        self.describe()
        self.state.stage = "probe"

    def describe(self) -> None:
        describe(self.parts, self.state)
        self.parts.reporter.save_config(run_config(self.parts, self.state))


def run_barlow_twins(settings) -> dict | None:
    """Pre-train, then probe (each only as far as the checkpoint has not); the final metrics."""
    from lars.signals import install_preemption_handler
    from lars.tasks.ssl_probe import probe_stage

    preemption = install_preemption_handler()  # first: a signal during start-up is not lost
    parts, state = build_run(settings, preemption)
    task = BarlowTwinsRun(parts, state)
    try:
        for line in task_lines(settings, parts.model.feature_width, parts.groups):
            parts.reporter.print(line)
        if state.stage == "probe":  # resumed in the probe
            task.describe()
        elif settings.task.probe_only:
            task.load_probe_only()
        else:
            task.pretrain()
        if state.stage == "train" and state.step < parts.plan.total_steps:
            parts.reporter.print(
                f"stopped at --max-steps {parts.plan.last_step} of {parts.plan.total_steps} "
                "steps: the linear probe runs once pre-training is complete"
            )
            return state.last_validation
        if settings.task.probe_epochs == 0:
            return state.last_validation
        return probe_stage(task)
    finally:
        preemption.uninstall()
        parts.reporter.close()
        parts.dist.shutdown()
