#!/usr/bin/env bash
# One-command set-up: virtual environment, PyTorch, MPI, Horovod (patched build, cached),
# mpi4py, this package, and the embedded sample dataset. Safe to run again: each step
# checks whether it is already done and skips it.
#
# Environment knobs (all optional):
#   LARS_VENV      virtual environment to create or reuse   (default: <repo>/.venv)
#   LARS_CACHE     cache for the built Horovod wheel         (default: ~/.cache/lars-imagenet)
#   PYTHON         interpreter used to create the venv       (default: python3)
#   LARS_SKIP_HOROVOD=1  do not build Horovod (single-process training still works)
#   LARS_WITH_DALI=0     do not install NVIDIA DALI (--data-backend dali-cpu/dali-gpu); it is
#                        installed by default on Linux x86_64/aarch64 (about 550 MB), so that
#                        the test suite runs its DALI tests
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${LARS_VENV:-$ROOT/.venv}
CACHE=${LARS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lars-imagenet}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
HOROVOD_VERSION=0.28.1
DALI_PACKAGE=nvidia-dali-cuda130  # matches torch's CUDA 13.0 build; CPU pipelines need no GPU
DALI_VERSION=2.4.0

say() { echo "[setup] $*"; }

# 1. Virtual environment.
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
fi
PY="$VENV/bin/python"
pip_install() {
  # pip's -q still warns about this machine's local package folders; keep real errors visible.
  "$PY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
has_version() { # has_version MODULE VERSION-PREFIX
  "$PY" - "$1" "$2" <<'PYEOF' >/dev/null 2>&1
import importlib, sys
m = importlib.import_module(sys.argv[1])
sys.exit(0 if m.__version__.split("+")[0] == sys.argv[2] else 1)
PYEOF
}

# 2. PyTorch (a CUDA build; it also runs on the CPU).
if has_version torch "$TORCH_VERSION" && has_version torchvision "$TORCHVISION_VERSION"; then
  say "torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION already installed"
else
  say "installing torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION (large: a few minutes)"
  pip_install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

# 3. This package (editable) with its dependencies and the test tools; redone only when
#    setup.py changes or the package moved.
stamp="$VENV/.lars-installed-$(cat "$ROOT/setup.py" "$ROOT/pyproject.toml" | sha1sum | cut -c1-12)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$ROOT" ]; then
  say "package and Python dependencies already installed"
else
  say "installing the lars package and its Python dependencies"
  pip_install -e "$ROOT[dev]"
  rm -f "$VENV"/.lars-installed-*
  echo "$ROOT" > "$stamp"
fi

# 4. MPI: use the one on PATH (a cluster's module), else install Debian's Open MPI when root.
if command -v mpicc >/dev/null 2>&1 && command -v mpirun >/dev/null 2>&1; then
  say "MPI found: $(command -v mpirun)"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  say "no MPI on PATH: installing Debian's Open MPI"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenmpi-dev openmpi-bin >/dev/null
else
  echo "[setup] error: no MPI found (mpicc, mpirun). Load your cluster's MPI module or install Open MPI, then run again." >&2
  exit 2
fi

# 5. mpi4py (built against the MPI above; pip caches the wheel).
"$PY" -c "import mpi4py" 2>/dev/null || { say "installing mpi4py"; pip_install mpi4py; }

# 6. Horovod 0.28.1, patched to build against torch 2.14 (see launch/build_horovod.sh).
if [ "${LARS_SKIP_HOROVOD:-0}" = 1 ]; then
  say "LARS_SKIP_HOROVOD=1: not installing Horovod"
elif "$PY" -c "import horovod.torch" 2>/dev/null; then
  say "Horovod already installed"
else
  PY="$PY" CACHE="$CACHE" HOROVOD_VERSION="$HOROVOD_VERSION" bash "$ROOT/launch/build_horovod.sh"
fi

# 7. NVIDIA DALI (optional data backend). The marker tells tests/test_dali.py that this venv
#    was meant to have it, so a broken install fails the tests instead of skipping them.
dali_marker="$VENV/.lars-with-dali"
if [ "${LARS_WITH_DALI:-1}" = 0 ] || ! [[ $(uname -sm) =~ ^Linux\ (x86_64|aarch64)$ ]]; then
  say "not installing NVIDIA DALI (LARS_WITH_DALI=0, or no wheel for $(uname -sm))"
  rm -f "$dali_marker"
elif has_version nvidia.dali "$DALI_VERSION"; then
  say "NVIDIA DALI $DALI_VERSION already installed"
  touch "$dali_marker"
else
  say "installing $DALI_PACKAGE $DALI_VERSION (about 550 MB)"
  pip_install "$DALI_PACKAGE==$DALI_VERSION"
  touch "$dali_marker"
fi

# 8. The fused CPU step of LARS/TVLARS/LAMB (lars/optim/_fused_cpu.cpp), compiled once into
#    torch's extension cache (~/.cache/torch_extensions; about 30 s; torch skips the build when
#    the source and flags are unchanged). Without a C++ compiler the optimizers use their eager
#    path, so this step only warns. The marker tells tests/test_optim_fused.py that the kernel
#    built here, so a later failure to load it fails the tests instead of skipping them.
fused_marker="$VENV/.lars-with-fused"
"$PY" -c "import ninja" 2>/dev/null || pip_install ninja # torch's extension builds need it
fused_reason=$("$PY" -c 'from lars.optim import _fused; print(_fused.unavailable_reason() or "")' 2>/dev/null || echo "lars.optim did not import")
if [ -z "$fused_reason" ]; then
  say "fused CPU optimizer step built (or already built)"
  touch "$fused_marker"
else
  say "warning: fused CPU optimizer step unavailable ($fused_reason); the optimizers use their foreach path"
  rm -f "$fused_marker"
fi

# 9. The embedded sample dataset (skipped when it is already complete).
"$PY" "$ROOT/data/build_sample.py" --quiet
say "done: activate with 'source $VENV/bin/activate'"
