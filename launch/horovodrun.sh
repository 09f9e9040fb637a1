#!/usr/bin/env bash
# horovodrun with this project's training script. Usage:
#
#   launch/horovodrun.sh NP [TRAINING FLAGS...]
#   launch/horovodrun.sh 2 --epochs 1                                    # this machine, 2 ranks
#   HOSTS=node1:4,node2:4 launch/horovodrun.sh 8 --model resnet50 --batch-size 128 \
#     --train-dir=IMAGENET/train --val-dir=IMAGENET/val --base-op lars ...  # 2 nodes x 4 GPUs
#
# What to edit for your cluster (or set in the environment):
#   HOSTS              host:slots list, slots = GPUs per host (empty: this machine only), or
#   HOSTFILE           a file with one "host slots=N" line per host
#   CONTROLLER         gloo (default: horovodrun starts the ranks over ssh itself, no MPI needed)
#                      or mpi (horovodrun calls mpirun; Horovod must be built with MPI)
#   NETWORK_INTERFACE  interface(s) between the nodes, e.g. ib0 or eth0 (comma-separated; empty:
#                      horovodrun finds common ones)
#   SSH_PORT           ssh port of the other hosts (empty: 22)
#   START_TIMEOUT      seconds to wait for every rank to start (default 120)
#   EXTRA_HOROVODRUN_FLAGS  anything else, e.g. "--verbose" or --mpi-args="..."
# Several hosts need passwordless ssh between them and the repository and its virtual
# environment (LARS_VENV, default <repo>/.venv) at the same path on every host. horovodrun adds
# the Open MPI flags Horovod wants (-bind-to none -map-by slot) itself. Inside a SLURM job use
# launch/slurm.sbatch instead. Launch defaults come from launch/env.sh (LARS_LAUNCH_DEFAULTS=0:
# none); horovodrun passes this environment to every rank.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
me=launch/horovodrun.sh
if [ $# -lt 1 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $me NP [TRAINING FLAGS...]   (NP: number of ranks, >= 1)" >&2
  exit 2
fi
np=$1; shift
VENV=${LARS_VENV:-$ROOT/.venv}
[ -x "$VENV/bin/horovodrun" ] || {
  echo "$me: error: no horovodrun in $VENV/bin: run launch/setup.sh or set LARS_VENV" >&2; exit 2; }

# shellcheck source=launch/env.sh
source "$ROOT/launch/env.sh"
nodes=1  # hosts the ranks spread over: lines of HOSTFILE, or entries of HOSTS
if [ -n "${HOSTFILE:-}" ] && [ -f "$HOSTFILE" ]; then
  nodes=$(grep -cEv '^[[:space:]]*(#|$)' "$HOSTFILE" || true)
elif [ -n "${HOSTS:-}" ]; then
  IFS=, read -r -a host_list <<<"$HOSTS"
  nodes=${#host_list[@]}
fi
[ "$nodes" -ge 1 ] 2>/dev/null || nodes=1
lars_launch_env $(( (np + nodes - 1) / nodes ))

flags=(-np "$np")
case ${CONTROLLER:-gloo} in
  gloo | mpi) flags+=("--${CONTROLLER:-gloo}") ;;
  *) echo "$me: error: CONTROLLER=$CONTROLLER is not gloo or mpi" >&2; exit 2 ;;
esac
if [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || { echo "$me: error: HOSTFILE=$HOSTFILE: no such file" >&2; exit 2; }
  flags+=(--hostfile "$HOSTFILE")
elif [ -n "${HOSTS:-}" ]; then
  flags+=(-H "$HOSTS")
fi
if [ -n "${NETWORK_INTERFACE:-}" ]; then flags+=(--network-interface "$NETWORK_INTERFACE"); fi
if [ -n "${SSH_PORT:-}" ]; then flags+=(-p "$SSH_PORT"); fi
flags+=(--start-timeout "${START_TIMEOUT:-120}")
if [ -n "${EXTRA_HOROVODRUN_FLAGS:-}" ]; then
  # shellcheck disable=SC2206  # split on purpose: several flags in one variable
  flags+=($EXTRA_HOROVODRUN_FLAGS)
fi

cd "$ROOT"  # with gloo, horovodrun starts every rank in this folder
export PATH="$VENV/bin:$PATH"
exec "$VENV/bin/horovodrun" "${flags[@]}" "$VENV/bin/python" pytorch_imagenet_resnet.py "$@"
