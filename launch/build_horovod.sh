#!/usr/bin/env bash
# Build Horovod 0.28.1 against torch 2.14 and install it into the environment of $PY.
#
# Horovod's last release predates torch 2.14, whose headers need C++20; Horovod's CMake files ask
# for C++14. We download the source distribution, raise the standard to C++20, build a wheel once
# and keep it in $CACHE/wheels so later set-ups install it in seconds. On a cluster, set
# HOROVOD_GPU_OPERATIONS=NCCL (and load your MPI/CUDA modules) before running: the variables are
# passed through to Horovod's build.
set -euo pipefail
PY=${PY:-python3}
CACHE=${CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lars-imagenet}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
say() { echo "[build_horovod] $*"; }

TORCH_TAG=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
PY_TAG=$("$PY" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
WHEEL_DIR="$CACHE/wheels/torch-$TORCH_TAG"
mkdir -p "$WHEEL_DIR"
wheel=$(ls "$WHEEL_DIR"/horovod-"$HOROVOD_VERSION"-"$PY_TAG"-*.whl 2>/dev/null | head -n 1 || true)

if [ -z "$wheel" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  say "downloading the Horovod $HOROVOD_VERSION source distribution"
  "$PY" -m pip download -q --no-deps --no-binary :all: -d "$work" "horovod==$HOROVOD_VERSION"
  tar -xzf "$work"/horovod-"$HOROVOD_VERSION".tar.gz -C "$work"
  src="$work/horovod-$HOROVOD_VERSION"
  # torch >= 2.10 headers refuse anything older than C++20.
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 20)/' \
    "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 20' "$src/horovod/torch/CMakeLists.txt"
  # A CUDA build of torch makes CMake look for the CUDA toolkit; point it at the real one.
  if [ -z "${CUDA_HOME:-}" ]; then
    for d in /usr/local/cuda-13.0 /usr/local/cuda; do [ -d "$d/bin" ] && { export CUDA_HOME=$d; break; }; done
  fi
  if [ -n "${CUDA_HOME:-}" ]; then
    export CUDAToolkit_ROOT=$CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
  fi
  # Horovod's build calls cmake; use the system's or a pip-installed one beside $PY.
  export PATH="$(dirname "$PY"):$PATH"
  command -v cmake >/dev/null 2>&1 || "$PY" -m pip install -q "cmake>=3.13,<4"
  say "compiling Horovod (about 15 minutes on 2 cores; done once, then cached in $WHEEL_DIR)"
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=${HOROVOD_WITH_GLOO:-1} \
  HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WHEEL_DIR" "$src"
  wheel=$(ls "$WHEEL_DIR"/horovod-"$HOROVOD_VERSION"-"$PY_TAG"-*.whl | head -n 1)
fi
say "installing $(basename "$wheel")"
"$PY" -m pip install -q --disable-pip-version-check "$wheel"
"$PY" -c "import horovod.torch as hvd; hvd.init(); print('[build_horovod] horovod', hvd.__version__ if hasattr(hvd, '__version__') else '', 'mpi built:', hvd.mpi_built(), 'gloo built:', hvd.gloo_built())"
