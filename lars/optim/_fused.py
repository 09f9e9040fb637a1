"""The fused CPU kernels of LARS/TVLARS and LAMB (``_fused_cpu.cpp``), built on first use.

The extension is compiled by ``torch.utils.cpp_extension.load`` into torch's extension cache
(``~/.cache/torch_extensions`` or ``$TORCH_EXTENSIONS_DIR``; ``launch/setup.sh`` builds it once, a
later load takes about a second) and reused while the source and flags are unchanged. Where it
cannot be built (no C++ compiler, no ninja, a failed build) or ``LARS_FUSED_CPU=0`` is set, the
optimizers take their eager multi-tensor path: :func:`unavailable_reason` says why, and one
warning is logged. The kernels read CPU tensors only; no device is involved, so reading a norm
inside them is no host synchronisation.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from ._common import same_strides

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_fused_cpu.cpp")
DTYPES = (torch.float32, torch.float64)
ENV = "LARS_FUSED_CPU"

_lock = threading.Lock()
_module: ModuleType | None = None
_reason: str | None = None  # why the extension is unavailable, once a load failed


def _flags() -> tuple[str, list[str]]:
    """Extension name and compiler flags for this CPU: AVX2 and FMA where torch itself found
    them (the build lives in a per-capability folder, so a shared home cache serves mixed
    nodes). -fopenmp makes at::parallel_for use torch's OpenMP threads (the extension then
    binds to the libgomp torch has loaded, which has the same soname); -fno-math-errno lets
    sqrt vectorise (its IEEE results are unchanged)."""
    flags = ["-O3", "-fopenmp", "-fno-math-errno"]
    capability = torch.backends.cpu.get_cpu_capability().lower()
    if capability.startswith("avx"):
        flags += ["-mavx2", "-mfma"]
    else:
        capability = "default"
    return f"lars_fused_cpu_{capability}", flags


def load() -> ModuleType | None:
    """The compiled extension, building it if needed; ``None`` where it is unavailable."""
    global _module, _reason
    if _module is not None or _reason is not None:
        return _module
    with _lock:
        if _module is not None or _reason is not None:
            return _module
        if os.environ.get(ENV, "1") == "0":
            _reason = f"{ENV}=0 is set"
        elif not SOURCE.is_file():
            _reason = f"its source {SOURCE.name} is not installed"
        else:
            try:
                cpp_extension = _import_cpp_extension()
                _find_venv_ninja()
                name, flags = _flags()
                _module = cpp_extension.load(
                    name, [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"]
                )
            except Exception as err:  # no compiler or ninja, a failed build: eager instead
                _reason = f"building it failed ({type(err).__name__}: {_first_error(err)})"
        if _reason is not None:
            log.warning("lars.optim: fused CPU step unavailable, %s; using foreach", _reason)
        return _module


def _find_venv_ninja() -> None:
    """torch runs `ninja` from PATH; the one `launch/setup.sh` installs lives beside this
    interpreter, which is not on PATH when the venv's python is called without activation."""
    here = Path(sys.executable).parent
    if shutil.which("ninja") is None and (here / "ninja").is_file():
        os.environ["PATH"] = os.pathsep.join([str(here), os.environ.get("PATH", "")])


def _import_cpp_extension() -> ModuleType:
    """torch.utils.cpp_extension, without the warning its import logs on every machine that has
    a CUDA toolkit folder but no GPU ("No CUDA runtime is found"): this build is CPU-only."""
    ext_log = logging.getLogger("torch.utils.cpp_extension")
    level = ext_log.level
    ext_log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        ext_log.setLevel(level)
    return cpp_extension


def _first_error(err: Exception) -> str:
    """The compiler's first error line (ninja's own message ends the text), else the last."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or ["no message"]
    errors = [line for line in lines if "error:" in line or "not found" in line]
    return (errors or lines[-1:])[0][:300]


def unavailable_reason() -> str | None:
    """``None`` when the fused CPU kernels can be used (loading them if needed), else why not."""
    load()
    return _reason


def fusable(lists: Sequence[Sequence[Tensor]], steps: Sequence[Tensor] | None) -> list[bool]:
    """Per parameter (``lists[0][i]``, with its gradient and state tensors ``lists[k][i]``):
    whether it can go to the fused kernels. Float32/float64 CPU tensors, dense (contiguous or
    channels_last) with one layout for all, a float32 CPU step count; never under
    ``torch.compile``, and only where the extension is built."""
    n = len(lists[0])
    on_cpu = any(t.device.type == "cpu" for t in lists[0])  # GPU runs never build it
    if not on_cpu or torch.compiler.is_compiling() or load() is None:
        return [False] * n
    return [
        _fusable_one(lists[0][i], [lst[i] for lst in lists[1:]], steps[i] if steps else None)
        for i in range(n)
    ]


def _fusable_one(first: Tensor, others: list[Tensor], step: Tensor | None) -> bool:
    return (
        first.device.type == "cpu"
        and first.dtype in DTYPES
        and (first.is_contiguous() or _channels_last(first))
        and same_strides(first, others)
        and all(t.dtype == first.dtype for t in others)
        and (step is None or (step.dtype == torch.float32 and step.device.type == "cpu"))
    )


def _channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def empty_scale() -> Tensor:
    """The kernels' "no scale" argument."""
    return torch.empty(0, dtype=torch.float64)
