"""The training system: data, model, optimizer, schedule, the step loop, evaluation, checkpoints.

`run(args)` trains with the resolved configuration of `lars.config`. Every rank runs it; the
distributed runtime sits behind `lars.distributed`. One optimizer step consumes k =
`--batches-per-allreduce` micro-batches (see `optimizer_step`, the only place that orders the
step). Each epoch runs `steps_per_epoch` whole optimizer steps: the ragged micro-batches at the end
of an epoch that would not fill a k-group are dropped, so Horovod always sees exactly k backward
passes per step (horovod#2466).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from itertools import islice

import torch
import torch.nn as nn

from lars.checkpoint import find_resume_checkpoint, load_checkpoint, save_checkpoint
from lars.config import UsageError
from lars.data.loaders import DataConfig, build_loaders
from lars.data.sample import build_sample_dataset
from lars.distributed import init_distributed
from lars.factory import build_optimizer
from lars.metrics import TrainMeter, evaluate
from lars.models import build_model
from lars.param_groups import param_group_summary, param_groups
from lars.reporting import Reporter, versions
from lars.schedules import build_scheduler, epochs_to_steps, lr_at, scale_lr


@dataclass
class RunPlan:
    """Numbers derived from the flags and the world size; saved in config.json."""

    world_size: int
    global_batch_size: int
    lr: float
    train_images: int
    val_images: int
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    tv_delay_steps: int


def plan_run(args, world_size: int, train_images: int, val_images: int) -> RunPlan:
    per_rank = -(-train_images // world_size)  # DistributedSampler pads to a multiple of W
    micro = per_rank // args.batch_size
    steps = micro // args.batches_per_allreduce
    global_batch = args.batch_size * world_size * args.batches_per_allreduce
    if steps == 0:
        raise UsageError(
            f"the global batch ({args.batch_size} x {world_size} ranks x "
            f"{args.batches_per_allreduce} = {global_batch}) is larger than the training set "
            f"({train_images} images): lower --batch-size or --batches-per-allreduce")
    return RunPlan(
        world_size=world_size, global_batch_size=global_batch,
        lr=scale_lr(args.base_lr, global_batch, args.lr_reference_batch, args.lr_scaling),
        train_images=train_images, val_images=val_images, micro_batches_per_epoch=micro,
        steps_per_epoch=steps, total_steps=steps * args.epochs,
        warmup_steps=epochs_to_steps(args.warmup_epochs, steps),
        tv_delay_steps=epochs_to_steps(args.tv_delay_epochs, steps))


def default_log_dir(args, global_batch: int) -> str:
    return os.path.join("runs", f"{args.dataset}-{args.model}-{args.base_op}-gb{global_batch}")


def make_optimizer(args, model: nn.Module, plan: RunPlan):
    if args.bn_bias_separately:
        groups = param_groups(model, args.wd)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad],
                   "weight_decay": args.wd}]
    optimizer = build_optimizer(
        args.base_op, groups, lr=plan.lr, momentum=args.momentum, weight_decay=args.wd,
        trust_coefficient=args.trust_coefficient, lmbda=args.lmbda, alpha=args.tv_alpha,
        delay_steps=plan.tv_delay_steps, min_scale=args.tv_min_scale)
    return optimizer, groups


def optimizer_step(model, batches, k, loss_fn, optimizer, scheduler, dist, meter, device):
    """One optimizer step over k micro-batches, in the one order that is correct with Horovod:
    forward, loss / k, backward (k times; Horovod allreduces during the k-th backward);
    synchronise; step without a second synchronisation; schedule; zero_grad."""
    for images, labels in islice(batches, k):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        output = model(images)
        loss = loss_fn(output, labels)
        (loss / k).backward()
        meter.update(loss, output, labels)
    dist.synchronize(optimizer)
    dist.step(optimizer)
    scheduler.step()
    optimizer.zero_grad()  # torch >= 2 sets grads to None (Horovod's wrapper takes no flag)


class Run:
    """Everything one training run holds; `train()` is the loop."""

    def __init__(self, args) -> None:
        self.args = args
        self.dist = dist = init_distributed()
        cores = os.cpu_count() or 1
        torch.set_num_threads(args.threads or max(1, cores // dist.local_size))
        if args.workers is None:
            args.workers = max(0, min(8, cores // dist.local_size - 1))
        cuda = torch.cuda.is_available() and not args.no_cuda
        if cuda:
            torch.cuda.set_device(dist.local_rank)
        self.device = torch.device("cuda" if cuda else "cpu")
        torch.manual_seed(args.seed)

        if args.dataset == "sample":  # built on first use; safe when all ranks start at once
            root = build_sample_dataset(quiet=dist.rank != 0)
            args.train_dir, args.val_dir = str(root / "train"), str(root / "val")
        data_cfg = DataConfig(
            train_dir=args.train_dir, val_dir=args.val_dir, synthetic=args.synthetic,
            image_size=args.image_size, min_crop_scale=args.min_crop_scale, hflip=args.hflip,
            batch_size=args.batch_size, val_batch_size=args.val_batch_size,
            workers=args.workers, seed=args.seed)
        try:
            self.data = build_loaders(data_cfg, dist.rank, dist.size, pin_memory=cuda)
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(str(error)) from None
        self.plan = plan = plan_run(args, dist.size, self.data.train_size, self.data.val_size)
        args.log_dir = args.log_dir or default_log_dir(args, plan.global_batch_size)

        self.model = build_model(args.model, self.data.num_classes).to(self.device)
        optimizer, self.groups = make_optimizer(args, self.model, plan)
        self.optimizer = dist.wrap_optimizer(optimizer, self.model, args.batches_per_allreduce,
                                             args.fp16_allreduce, args.use_adasum)
        self.scheduler = build_scheduler(
            self.optimizer, schedule=args.schedule, total_steps=plan.total_steps,
            warmup_steps=plan.warmup_steps, end_lr=args.end_lr, power=args.lr_power,
            milestones=[plan.steps_per_epoch * e for e in (30, 60, 80)])
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        self.names = {id(p): n for n, p in self.model.named_parameters()}
        self.epoch, self.global_step, self.final = 0, 0, None
        resumed = self._resume()
        dist.broadcast_model(self.model)
        self.reporter = Reporter(args.log_dir, enabled=dist.rank == 0,
                                 purge_step=self.global_step if resumed else None)

    def _resume(self) -> bool:
        """Rank 0 chooses the checkpoint and broadcasts its contents; every rank loads them."""
        args, payload = self.args, None
        if self.dist.rank == 0 and args.resume != "none":
            if args.resume == "auto":
                found = find_resume_checkpoint(args.log_dir)
                payload = found[1] if found else None
            else:
                try:
                    payload = load_checkpoint(args.resume)
                except ValueError as error:
                    payload = {"error": str(error)}
        payload = self.dist.broadcast_object(payload)
        if payload is None:
            return False
        if "error" in payload:
            raise UsageError(f"--resume: {payload['error']}")
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.epoch, self.global_step = payload["epoch"], payload["global_step"]
        self.final = payload.get("final")
        return True

    def config(self) -> dict:
        args = {k: v for k, v in vars(self.args).items() if not k.startswith("_")}
        return {"args": args, "plan": asdict(self.plan), "backend": self.dist.name,
                "device": str(self.device), "versions": versions(),
                "threads": torch.get_num_threads()}

    def save(self, finished_epoch: bool) -> None:
        if self.dist.rank != 0:
            return
        payload = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                   "scheduler": self.scheduler.state_dict(),
                   "epoch": self.epoch + (1 if finished_epoch else 0),
                   "global_step": self.global_step, "final": self.final,
                   "config": {k: v for k, v in vars(self.args).items()
                              if isinstance(v, (int, float, str, bool, type(None)))}}
        save_checkpoint(payload, self.args.log_dir, self.global_step, self.args.keep_checkpoints)

    def describe(self) -> None:
        r, plan, args = self.reporter, self.plan, self.args
        r.print(f"run: {args.dataset} {args.model} {args.base_op} on {plan.world_size} rank(s) "
                f"({self.dist.name}, {self.device}); log dir {args.log_dir}")
        r.print(f"global batch {plan.global_batch_size} = {args.batch_size} x {plan.world_size} "
                f"x {args.batches_per_allreduce}; lr {plan.lr:.6g} ({args.lr_scaling} scaling of "
                f"{args.base_lr:g}); {plan.steps_per_epoch} steps/epoch, {plan.total_steps} "
                f"steps, {plan.warmup_steps} warm-up steps, schedule {args.schedule}")
        r.print(param_group_summary(self.model, self.groups))

    def log_train(self, meter: TrainMeter, images: int, seconds: float) -> None:
        stats = meter.read_and_reset(self.dist)  # every rank joins this allreduce
        if self.dist.rank != 0:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        values = {"train/loss": stats["loss"], "train/top1": stats["top1"], "train/lr": lr,
                  "train/images_per_sec": images / max(seconds, 1e-9)}
        trust = getattr(self.optimizer, "last_trust_ratios", None)
        if trust is not None:
            for param, ratio in trust():
                values[f"trust_ratio/{self.names.get(id(param), 'unnamed')}"] = float(ratio)
        phi = getattr(self.optimizer, "last_phi", None)
        if phi is not None:
            values["tvlars/phi"] = float(phi)
        self.reporter.scalars(values, self.global_step)
        self.reporter.print(
            f"epoch {self.epoch + 1}/{self.args.epochs} step {self.global_step}/"
            f"{self.plan.total_steps}: loss {stats['loss']:.4f} top1 {stats['top1']:.2f}% "
            f"lr {lr:.5g} {values['train/images_per_sec']:.1f} img/s")

    def validate(self) -> dict[str, float]:
        metrics = evaluate(self.model, self.data.val, self.dist, self.device)
        self.reporter.scalars({f"val/{k}": metrics[k] for k in ("loss", "top1", "top5")},
                              self.global_step)
        self.reporter.print(f"epoch {self.epoch + 1}: val loss {metrics['loss']:.4f} top1 "
                            f"{metrics['top1']:.2f}% top5 {metrics['top5']:.2f}% "
                            f"({metrics['samples']} images)")
        return metrics

    def train(self) -> dict | None:
        args, plan, dist = self.args, self.plan, self.dist
        self.describe()
        self.reporter.save_config(self.config())
        max_steps = args.max_steps or plan.total_steps
        if self.global_step >= max_steps or self.epoch >= args.epochs:
            self.reporter.print(f"nothing to do: the checkpoint in {args.log_dir} is at step "
                                f"{self.global_step}, epoch {self.epoch}; final {self.final}")
            return self.final
        meter = TrainMeter(self.device)
        self.model.train()
        started = time.perf_counter()
        while self.epoch < args.epochs and self.global_step < max_steps:
            done_in_epoch = self.global_step - self.epoch * plan.steps_per_epoch
            sampler = self.data.train_sampler
            sampler.set_epoch(self.epoch)
            sampler.skip_samples = done_in_epoch * args.batches_per_allreduce * args.batch_size
            batches = iter(self.data.train)
            tick, tick_step = time.perf_counter(), self.global_step
            for _ in range(done_in_epoch, plan.steps_per_epoch):
                optimizer_step(self.model, batches, args.batches_per_allreduce, self.loss_fn,
                               self.optimizer, self.scheduler, dist, meter, self.device)
                self.global_step += 1
                if self.global_step % args.log_interval == 0:
                    now = time.perf_counter()
                    images = (self.global_step - tick_step) * plan.global_batch_size
                    self.log_train(meter, images, now - tick)
                    tick, tick_step = now, self.global_step
                if self.global_step >= max_steps:
                    break
            if self.global_step != tick_step:  # the steps since the last train log
                images = (self.global_step - tick_step) * plan.global_batch_size
                self.log_train(meter, images, time.perf_counter() - tick)
            finished_epoch = self.global_step % plan.steps_per_epoch == 0
            metrics = self.validate()
            self.final = {"epoch": self.epoch + 1, "step": self.global_step, **metrics}
            self.save(finished_epoch)
            self.epoch += int(finished_epoch)
        self.reporter.print(f"done: {self.global_step} steps in "
                            f"{time.perf_counter() - started:.1f} s; final val top1 "
                            f"{self.final['top1']:.2f}% loss {self.final['loss']:.4f}")
        return self.final

    def close(self) -> None:
        self.reporter.close()


def run(args) -> dict | None:
    trainer = Run(args)
    try:
        return trainer.train()
    finally:
        trainer.close()
