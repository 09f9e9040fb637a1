#!/usr/bin/env bash
# Quick start, part 1: set up (skips what is done), then train on the embedded sample dataset with
# 2 ranks on the CPU. Extra arguments go to pytorch_imagenet_resnet.py. Running it again resumes
# the finished run from its checkpoint and does nothing more (pass --resume none to start over).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${LARS_VENV:-$ROOT/.venv}
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
export PATH="$VENV/bin:$PATH"
exec "$ROOT/launch/mpirun.sh" "${NP:-2}" "$VENV/bin/python" pytorch_imagenet_resnet.py "$@"
