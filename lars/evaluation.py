"""`--evaluate`: score a checkpoint on the validation set, on any number of ranks, train nothing.

The checkpoint is the one `--resume` names (auto: the newest in `--log-dir`; or a path), and it
must belong to these settings (`lars.resume`; the batch geometry aside): scoring a checkpoint
with another model, crop or precision is refused, naming the differences, unless
`--allow-change` names them (e.g. to score with another `--val-crop-ratio`). Each rank scores a
disjoint, unpadded shard with the checkpoint's weights and BatchNorm statistics (the ranks'
mean, as saved) and the counts are summed, so the figures are the whole set's at any number of
ranks. Rank 0 prints `top1 X% top5 Y% loss Z` as the last line and writes them to
`<log-dir>/evaluation-<step>.json`.
"""

from __future__ import annotations

import functools
import json
import os

import torch

from lars.build import AMP_DTYPES, build_datasets, build_loaders, build_model
from lars.data.fast import normalize_batch
from lars.distributed import init_distributed, launched_rank
from lars.errors import ResumeError
from lars.fingerprint import fingerprint
from lars.metrics import evaluate
from lars.plan import plan_run
from lars.resume import allowed_differences, choose_checkpoint, identity

# The batch geometry shapes training, not scoring: any number of ranks may evaluate.
EVALUATION_IGNORES = ("global_batch_size", "batch_size")


def evaluate_checkpoint(settings) -> dict:
    """The checkpoint's whole-set loss, top-1 and top-5 (percent) and sample count."""
    from lars.train import configure_torch

    hw = settings.hardware
    cuda = torch.cuda.is_available() and not hw.no_cuda
    found = build_datasets(settings, quiet=launched_rank() != 0)
    dist = init_distributed(hw.backend, cuda, hw.stall_timeout, hw.fp16_allreduce, hw.use_adasum)
    try:
        device = configure_torch(settings, dist, cuda)
        data = build_loaders(settings, dist, cuda, found)
        plan = plan_run(settings, dist.size, data.train_size, data.val_size)
        payload = choose_checkpoint(settings, dist)
        if payload is None:
            raise ResumeError(
                f"--evaluate: no checkpoint in --log-dir {settings.run.log_dir} (train first, "
                "or name one with --resume PATH)"
            )
        allowed_differences(settings, plan, payload, ignore=EVALUATION_IGNORES)
        model = build_model(settings, data.num_classes, device)
        model.load_state_dict(payload["model"])
        metrics = evaluate(
            model,
            data.val,
            dist,
            device,
            amp_dtype=AMP_DTYPES.get(settings.model.amp),
            prepare=functools.partial(normalize_batch, device=device) if data.uint8 else None,
            channels_last=settings.model.channels_last,
        )
        bad = [p for paths in dist.allgather_object(metrics.pop("bad_paths")) for p in paths]
        if dist.rank == 0:
            _report(settings, plan, payload, metrics, bad)
        return metrics
    finally:
        dist.shutdown()


def _report(settings, plan, payload: dict, metrics: dict, bad: list[str]) -> None:
    step, log_dir = payload["global_step"], settings.run.log_dir
    record = {
        "step": step,
        "checkpoint": payload.get("path"),
        "fingerprint": fingerprint(identity(settings, plan)),
        **metrics,
        "unreadable_files": len(bad),
    }
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, f"evaluation-{step:09d}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(record, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, path)
    if bad:
        print(f"warning: {len(bad)} unreadable file(s) skipped: {', '.join(bad[:5])}")
    print(
        f"evaluated {payload.get('path')} (step {step}) on {metrics['samples']} images; "
        f"written to {path}"
    )
    print(
        f"top1 {metrics['top1']:.2f}% top5 {metrics['top5']:.2f}% loss {metrics['loss']:.4f}",
        flush=True,
    )
