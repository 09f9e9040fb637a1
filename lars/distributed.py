"""One small interface over the distributed runtime; the training loop never imports Horovod.

`init_distributed()` returns a backend with rank/size, optimizer wrapping, broadcasts and a
sum-allreduce. `HorovodBackend` is used when Horovod imports (under `mpirun -np N`, or alone with
N = 1); `LocalBackend` runs a single process without it. Horovod is imported only here.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "HOROVOD_RANK", "RANK",
                   "SLURM_PROCID")
_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "HOROVOD_SIZE", "WORLD_SIZE")


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 if none): usable before any init."""
    for name in _RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def launched_size() -> int:
    for name in _SIZE_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


class LocalBackend:
    """World size 1, no communication."""

    name = "local"
    rank = local_rank = 0
    size = local_size = 1

    def wrap_optimizer(self, optimizer, model, batches_per_allreduce, fp16_allreduce, adasum):
        return optimizer

    def broadcast_model(self, model: torch.nn.Module) -> None:
        pass

    def broadcast_object(self, obj, name: str = "lars.object"):
        return obj

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def allreduce_sum_async(self, tensor: torch.Tensor):
        return tensor

    def wait(self, handle) -> torch.Tensor:
        return handle

    def allgather_object(self, obj, name: str = "lars.gather") -> list:
        return [obj]

    def synchronize(self, optimizer) -> None:
        pass

    def step(self, optimizer) -> None:
        optimizer.step()

    def skip_synchronize(self, optimizer):
        return nullcontext()

    def shutdown(self) -> None:
        pass


class HorovodBackend:
    """Horovod: MPI or Gloo collectives, DistributedOptimizer with gradient accumulation."""

    name = "horovod"

    def __init__(self, stall_timeout: float | None = None) -> None:
        if stall_timeout:
            # Horovod's coordinator warns about ranks that stop submitting collectives and, past
            # the shutdown time, ends the job instead of waiting forever (read at hvd.init()).
            os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS",
                                  str(max(1, int(min(60, stall_timeout / 2)))))
            os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(int(stall_timeout)))
        import horovod.torch as hvd

        self.hvd = hvd
        hvd.init()
        self.rank, self.size = hvd.rank(), hvd.size()
        self.local_rank, self.local_size = hvd.local_rank(), hvd.local_size()

    def wrap_optimizer(self, optimizer, model, batches_per_allreduce, fp16_allreduce, adasum):
        hvd = self.hvd
        return hvd.DistributedOptimizer(
            optimizer,
            named_parameters=model.named_parameters(),
            compression=hvd.Compression.fp16 if fp16_allreduce else hvd.Compression.none,
            op=hvd.Adasum if adasum else hvd.Average,
            backward_passes_per_step=batches_per_allreduce,
        )

    def broadcast_model(self, model: torch.nn.Module) -> None:
        # Parameters and buffers (BatchNorm running statistics) start equal on every rank.
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def broadcast_object(self, obj, name: str = "lars.object"):
        # An explicit name: Horovod's default is the object's type, which differs between the
        # root (a dict) and the others (None), and the collective would never match.
        return self.hvd.broadcast_object(obj, root_rank=0, name=name)

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.hvd.allreduce(tensor, op=self.hvd.Sum)

    def allreduce_sum_async(self, tensor: torch.Tensor):
        return self.hvd.allreduce_async(tensor, op=self.hvd.Sum, name="lars.stop_flag")

    def wait(self, handle) -> torch.Tensor:
        return self.hvd.synchronize(handle)

    def allgather_object(self, obj, name: str = "lars.gather") -> list:
        return self.hvd.allgather_object(obj, name=name)

    def synchronize(self, optimizer) -> None:
        # Waits for the gradient allreduce started by the k-th backward pass; after it the
        # gradients are averaged and may be unscaled and clipped before the step.
        optimizer.synchronize()

    def step(self, optimizer) -> None:
        with optimizer.skip_synchronize():
            optimizer.step()

    def skip_synchronize(self, optimizer):
        return optimizer.skip_synchronize()

    def shutdown(self) -> None:
        self.hvd.shutdown()


def horovod_available() -> bool:
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        return False
    return True


def init_distributed(stall_timeout: float | None = None):
    """Horovod when importable; otherwise a single process. Raises RuntimeError if launched with
    several ranks and Horovod is missing (every rank would train alone)."""
    if horovod_available():
        return HorovodBackend(stall_timeout)
    if launched_size() > 1:
        raise RuntimeError(
            f"launched with {launched_size()} ranks but Horovod is not installed in this "
            "environment; run launch/setup.sh (or start one process)"
        )
    return LocalBackend()
