"""One small interface over the distributed runtime; the training loop never imports Horovod.

`init_distributed(backend)` returns one of:

- `HorovodBackend`: Horovod's DistributedOptimizer averages gradients; with k micro-batches per
  step it counts backward passes and allreduces during the k-th (`backward_passes_per_step`).
- `TorchBackend`: torch.distributed (NCCL on GPU, Gloo on CPU) with DistributedDataParallel; the
  first k - 1 micro-batches run under `no_sync()`, so gradients are allreduced once per step. It
  starts under `torchrun` (RANK, WORLD_SIZE, MASTER_ADDR/PORT), under `mpirun` or `srun` (rank and
  size from the MPI/PMI/SLURM variables; rank 0's address and a free port are shared with
  mpi4py when MASTER_ADDR is not set).
- `LocalBackend`: one process, no communication.

Every backend offers the same verbs: wrap the model and the optimizer, a context for each
micro-batch, synchronise and step, broadcasts from rank 0, sums across ranks. How gradients travel
(`fp16_allreduce`, `adasum`) is fixed when the backend is made and never changes afterwards.
"""

from __future__ import annotations

import datetime
import os
import socket
from contextlib import nullcontext

import torch

from lars.errors import BackendError

# Rank and size as each launcher sets them (Open MPI, PMI, PMIx, Horovod, SLURM); the first wins.
_RANK_VARIABLES = "OMPI_COMM_WORLD_RANK PMI_RANK PMIX_RANK HOROVOD_RANK RANK SLURM_PROCID".split()
_SIZE_VARIABLES = "OMPI_COMM_WORLD_SIZE PMI_SIZE HOROVOD_SIZE WORLD_SIZE SLURM_NTASKS".split()
_LOCAL_RANK_VARIABLES = (
    "OMPI_COMM_WORLD_LOCAL_RANK MPI_LOCALRANKID LOCAL_RANK SLURM_LOCALID".split()
)
_LOCAL_SIZE_VARIABLES = (
    "OMPI_COMM_WORLD_LOCAL_SIZE MPI_LOCALNRANKS LOCAL_WORLD_SIZE SLURM_NTASKS_PER_NODE".split()
)
BACKENDS = ("auto", "horovod", "torch")


def _first_int(names, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return default


def _torchrun() -> bool:
    # torchrun's variables win: a process started by torchrun may inherit MPI variables from
    # its parent (a singleton MPI_Init there sets OMPI_COMM_WORLD_*), and those would be wrong.
    return "TORCHELASTIC_RUN_ID" in os.environ


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 if none): usable before any init."""
    return _first_int(("RANK",) if _torchrun() else _RANK_VARIABLES, 0)


def launched_size() -> int:
    return _first_int(("WORLD_SIZE",) if _torchrun() else _SIZE_VARIABLES, 1)


def launched_local_size() -> int:
    """Ranks on this node as the launcher set them (1 if none): usable before any init."""
    return _first_int(("LOCAL_WORLD_SIZE",) if _torchrun() else _LOCAL_SIZE_VARIABLES, 1)


class LocalBackend:
    """World size 1, no communication. The base of the other backends' shared defaults."""

    name = "local"
    rank = local_rank = 0
    size = local_size = 1
    notice = ""
    fp16_allreduce = adasum = False

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def wrap_optimizer(self, optimizer, model, batches_per_allreduce: int):
        return optimizer

    def micro_batch(self, model, last: bool):
        """Context for one micro-batch's forward and backward; `last` ends the step."""
        return nullcontext()

    def broadcast_model(self, model: torch.nn.Module) -> None:
        pass

    def broadcast_object(self, obj, name: str = "lars.object"):
        return obj

    def allgather_object(self, obj, name: str = "lars.gather") -> list:
        return [obj]

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def allreduce_sum_async(self, tensor: torch.Tensor):
        return tensor

    def wait(self, handle) -> torch.Tensor:
        return handle

    def synchronize(self, optimizer) -> None:
        pass

    def all_finite(self, finite: torch.Tensor) -> bool:
        """The verdict of every rank on its gradients being finite. After an averaging
        allreduce the gradients are the same everywhere, so each rank's own verdict is it."""
        return bool(finite)

    def step(self, optimizer) -> None:
        optimizer.step()

    def skip_synchronize(self, optimizer):
        """Context in which optimizer.step() does not synchronise again (GradScaler.step)."""
        return nullcontext()

    def shutdown(self) -> None:
        pass


class HorovodBackend(LocalBackend):
    """Horovod: MPI or Gloo collectives, DistributedOptimizer with gradient accumulation."""

    name = "horovod"

    def __init__(self, stall_timeout=None, fp16_allreduce=False, adasum=False) -> None:
        self.fp16_allreduce, self.adasum = fp16_allreduce, adasum
        if stall_timeout:
            # Horovod's coordinator warns about ranks that submit different collectives and,
            # past the shutdown time, ends the job instead of waiting forever (read at init).
            check_every = max(1, int(min(60, stall_timeout / 2)))
            os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(check_every))
            os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(int(stall_timeout)))
        import horovod.torch as hvd

        self.hvd = hvd
        hvd.init()
        self.rank, self.size = hvd.rank(), hvd.size()
        self.local_rank, self.local_size = hvd.local_rank(), hvd.local_size()

    def wrap_optimizer(self, optimizer, model, batches_per_allreduce: int):
        hvd = self.hvd
        compression = hvd.Compression.fp16 if self.fp16_allreduce else hvd.Compression.none
        return hvd.DistributedOptimizer(
            optimizer,
            named_parameters=model.named_parameters(),
            compression=_Contiguous(compression),
            op=hvd.Adasum if self.adasum else hvd.Average,
            backward_passes_per_step=batches_per_allreduce,
        )

    def broadcast_model(self, model: torch.nn.Module) -> None:
        # Parameters and buffers (BatchNorm running statistics) start equal on every rank.
        # Horovod takes contiguous tensors only; channels_last weights travel as copies.
        state = model.state_dict()
        dense = {name: t if t.is_contiguous() else t.contiguous() for name, t in state.items()}
        self.hvd.broadcast_parameters(dense, root_rank=0)
        with torch.no_grad():
            for name, tensor in state.items():
                if dense[name] is not tensor:
                    tensor.copy_(dense[name])

    def broadcast_object(self, obj, name: str = "lars.object"):
        # An explicit name: Horovod's default is the object's type, which differs between the
        # root (a dict) and the others (None), and the collective would never match.
        return self.hvd.broadcast_object(obj, root_rank=0, name=name)

    def allgather_object(self, obj, name: str = "lars.gather") -> list:
        return self.hvd.allgather_object(obj, name=name)

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.hvd.allreduce(tensor, op=self.hvd.Sum)

    def allreduce_sum_async(self, tensor: torch.Tensor):
        return self.hvd.allreduce_async(tensor, op=self.hvd.Sum, name="lars.stop_flag")

    def wait(self, handle) -> torch.Tensor:
        return self.hvd.synchronize(handle)

    def synchronize(self, optimizer) -> None:
        # Waits for the gradient allreduce started by the k-th backward pass; after it the
        # gradients are averaged and may be unscaled and clipped before the step. Adasum
        # instead reduces the updates inside step(), so there is nothing to wait for here.
        if not self.adasum:
            optimizer.synchronize()

    def all_finite(self, finite: torch.Tensor) -> bool:
        if not self.adasum:
            return bool(finite)
        # Adasum: gradients are still local, so the ranks must agree explicitly.
        bad = (~finite).to(torch.int32).cpu()
        return int(self.hvd.allreduce(bad, op=self.hvd.Sum, name="lars.nonfinite")) == 0

    def step(self, optimizer) -> None:
        with self.skip_synchronize(optimizer):  # Adasum cannot skip its own synchronisation
            optimizer.step()

    def skip_synchronize(self, optimizer):
        return nullcontext() if self.adasum else optimizer.skip_synchronize()

    def shutdown(self) -> None:
        self.hvd.shutdown()


class _Contiguous:
    """A Horovod compressor that hands Horovod contiguous gradients (it rejects others, and a
    channels_last convolution's gradient is not contiguous in the default sense)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def compress(self, tensor: torch.Tensor):
        return self.inner.compress(tensor.contiguous())

    def decompress(self, tensor: torch.Tensor, ctx):
        return self.inner.decompress(tensor, ctx)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class TorchBackend(LocalBackend):
    """torch.distributed + DistributedDataParallel; `no_sync()` for accumulation."""

    name = "torch"

    def __init__(self, cuda: bool, stall_timeout=None, fp16_allreduce=False, adasum=False) -> None:
        if adasum:
            raise BackendError("--use-adasum needs --backend horovod")
        import torch.distributed as dist

        self.dist, self.fp16_allreduce = dist, fp16_allreduce
        self.rank, self.size = launched_rank(), launched_size()
        local_rank_names = ("LOCAL_RANK",) if _torchrun() else _LOCAL_RANK_VARIABLES
        self.local_rank, self.local_size = _first_int(local_rank_names, 0), launched_local_size()
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = self._rendezvous()
        os.environ.setdefault("MASTER_PORT", "29500")
        timeout = datetime.timedelta(seconds=stall_timeout or 1800)
        dist.init_process_group(
            "nccl" if cuda else "gloo", rank=self.rank, world_size=self.size, timeout=timeout
        )
        # Small CPU-side collectives (stop flag, objects) go through Gloo even when NCCL
        # carries the gradients: NCCL only reduces GPU tensors.
        self.cpu_group = dist.new_group(backend="gloo") if cuda else None

    def _rendezvous(self) -> tuple[str, str]:
        """Under mpirun/srun without MASTER_ADDR: rank 0 picks an address and a free port."""
        if self.size == 1:
            return "127.0.0.1", str(_free_port())
        try:
            from mpi4py import MPI
        except ImportError:
            raise BackendError(
                "--backend torch under mpirun needs MASTER_ADDR and MASTER_PORT "
                "in the environment, or mpi4py to share them"
            ) from None
        address = (socket.gethostname(), str(_free_port())) if self.rank == 0 else None
        return MPI.COMM_WORLD.bcast(address, root=0)

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
        # broadcast_buffers=False: like Horovod, each rank keeps its own BatchNorm statistics
        # after the initial broadcast (DDP broadcasts parameters and buffers at construction).
        wrapped = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
        if self.fp16_allreduce:
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            wrapped.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return wrapped

    def micro_batch(self, model, last: bool):
        return nullcontext() if last else model.no_sync()

    def broadcast_object(self, obj, name: str = "lars.object"):
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def allgather_object(self, obj, name: str = "lars.gather") -> list:
        gathered = [None] * self.size
        self.dist.all_gather_object(gathered, obj, group=self.cpu_group)
        return gathered

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        result = tensor.clone()
        self.dist.all_reduce(result, op=self.dist.ReduceOp.SUM)
        return result

    def allreduce_sum_async(self, tensor: torch.Tensor):
        return tensor, self.dist.all_reduce(
            tensor, op=self.dist.ReduceOp.SUM, group=self.cpu_group, async_op=True
        )

    def wait(self, handle) -> torch.Tensor:
        tensor, work = handle
        work.wait()
        return tensor

    def shutdown(self) -> None:
        self.dist.destroy_process_group()


def horovod_available() -> bool:
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        return False
    return True


def init_distributed(
    backend="auto", cuda=False, stall_timeout=None, fp16_allreduce=False, adasum=False
) -> LocalBackend:
    """The backend asked for; `auto` is Horovod when it imports, else torch.distributed when
    launched with several ranks (with a notice), else a single process. BackendError when the
    one asked for is missing or cannot do what is asked."""
    options = dict(fp16_allreduce=fp16_allreduce, adasum=adasum)
    if backend == "horovod" or (backend == "auto" and horovod_available()):
        if not horovod_available():
            raise BackendError(
                "--backend horovod: Horovod is not installed in this environment; "
                "run launch/setup.sh, or use --backend torch"
            )
        return HorovodBackend(stall_timeout, **options)
    if backend == "torch" or launched_size() > 1:
        chosen = TorchBackend(cuda, stall_timeout, **options)
        if backend == "auto":
            chosen.notice = "Horovod is not installed: using torch.distributed instead"
        return chosen
    return LocalBackend()
