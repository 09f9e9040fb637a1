#!/usr/bin/env bash
# Quick start, part 2: set up (skips what is done), then run the test suite.
# Extra arguments go to pytest (e.g. -k accumulation, -x).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${LARS_VENV:-$ROOT/.venv}
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
export PATH="$VENV/bin:$PATH"
# Distributed tests fail, instead of skipping, when Horovod or MPI is missing after set-up.
export LARS_REQUIRE_DISTRIBUTED=${LARS_REQUIRE_DISTRIBUTED:-1}
exec "$VENV/bin/python" -m pytest -q "$@"
