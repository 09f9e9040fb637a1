#!/usr/bin/env bash
# mpirun with the flags Horovod jobs want. Usage:
#
#   launch/mpirun.sh NP COMMAND [ARGS...]
#   launch/mpirun.sh 2 python pytorch_imagenet_resnet.py            # laptop, sample data
#   HOSTS=node1:4,node2:4 launch/mpirun.sh 8 python pytorch_imagenet_resnet.py --train-dir ...
#
# What to edit for your cluster: HOSTS (host:slots list, or leave empty inside a SLURM/PBS
# allocation, which Open MPI reads itself), EXTRA_MPI_FLAGS (e.g. "-mca btl_tcp_if_include ib0"),
# and EXPORT_VARS (environment variables every rank needs).
#
# Open MPI flags used: -bind-to none -map-by slot (Horovod's recommendation: let each rank use its
# own cores and GPU), -x VAR to export the environment, --allow-run-as-root only when root, and
# --oversubscribe when asking for more ranks than this machine has cores (single-node runs only).
# Launch defaults (threads per rank; MPI yielding when ranks have under two cores each) come
# from launch/env.sh; LARS_LAUNCH_DEFAULTS=0 turns them off.
set -euo pipefail
if [ $# -lt 2 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/mpirun.sh NP COMMAND [ARGS...]   (NP: number of ranks, >= 1)" >&2
  exit 2
fi
np=$1; shift
# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ -n "${HOSTS:-}" ]; then  # host:slots,host:slots: the ranks spread over the hosts
  IFS=, read -r -a host_list <<<"$HOSTS"
  ranks_per_node=$(( (np + ${#host_list[@]} - 1) / ${#host_list[@]} ))
elif [ -n "${SLURM_JOB_NUM_NODES:-}" ]; then
  ranks_per_node=$(( (np + SLURM_JOB_NUM_NODES - 1) / SLURM_JOB_NUM_NODES ))
else
  ranks_per_node=$np
fi
lars_launch_env "$ranks_per_node"
command -v mpirun >/dev/null 2>&1 || { echo "launch/mpirun.sh: mpirun not found: run launch/setup.sh or load your MPI module" >&2; exit 2; }

flags=(-np "$np")
EXPORT_VARS=${EXPORT_VARS:-"PATH LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV LARS_SAMPLE_DIR OMP_NUM_THREADS NCCL_DEBUG NCCL_SOCKET_IFNAME HOROVOD_CYCLE_TIME HOROVOD_STALL_CHECK_TIME_SECONDS HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"}
if mpirun --version 2>&1 | grep -q "Open MPI"; then
  flags+=(-bind-to none -map-by slot -mca pml ob1 -mca btl ^openib)
  [ "$(id -u)" = 0 ] && flags+=(--allow-run-as-root)
  if [ -z "${HOSTS:-}" ] && [ -z "${SLURM_JOB_ID:-}" ] && [ "$np" -gt "$(nproc)" ]; then
    flags+=(--oversubscribe)
  fi
  for var in $EXPORT_VARS; do
    [ -n "${!var:-}" ] && flags+=(-x "$var")
  done
fi
[ -n "${HOSTS:-}" ] && flags+=(-H "$HOSTS")
# shellcheck disable=SC2206
[ -n "${EXTRA_MPI_FLAGS:-}" ] && flags+=($EXTRA_MPI_FLAGS)
exec mpirun "${flags[@]}" "$@"
