# Launch defaults shared by launch/mpirun.sh, launch/horovodrun.sh and launch/slurm.sbatch.
# Source it, then call lars_launch_env with the number of ranks on each node:
#
#   source launch/env.sh && lars_launch_env 8      # e.g. 8 GPUs per node
#
# Each setting is a default only: a value already in the environment wins, and
# LARS_LAUNCH_DEFAULTS=0 turns them all off (benchmarks/weak_scaling.py measures "before" so).
# They change nothing on a node where every rank has at least two cores (GPU nodes, usually):
# what they fix is ranks competing for cores, which is what CPU-only training with one rank per
# core (or more ranks than cores) does. Measured figures: benchmarks/README.md, "Weak scaling".

# lars_launch_env RANKS_PER_NODE [CORES]: export the defaults (CORES: default `nproc`, the cores
# this shell may run on, which honours cgroups, CPU affinity and SLURM's allocation).
lars_launch_env() {
  local ranks=${1:-1} cores=${2:-}
  [ "${LARS_LAUNCH_DEFAULTS:-1}" = 0 ] && return 0
  [ -n "$cores" ] || cores=$(nproc 2>/dev/null || echo 1)
  [ "$ranks" -ge 1 ] 2>/dev/null || ranks=1
  local per_rank=$((cores / ranks))
  [ "$per_rank" -ge 1 ] || per_rank=1

  # OpenMP/MKL threads per rank: the node's cores shared among its ranks. Without it every rank
  # of an mpirun started with -bind-to none sizes its pools to the whole node (N ranks x N
  # threads). The trainer sets torch's own intra-op threads the same way (or from --threads).
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$per_rank}

  # Fewer than two cores per rank: each rank's compute thread shares its core with Horovod's
  # background thread, which coordinates with the other ranks every HOROVOD_CYCLE_TIME (1 ms)
  # through a small MPI allreduce. Open MPI waits in MPI calls by polling, at full speed, so a
  # background thread that arrives first spins on the core its own compute thread needs until
  # the scheduler preempts it, every cycle. mpi_yield_when_idle=1 makes that wait call
  # sched_yield(), handing the core back at once. Open MPI turns it on by itself only when
  # ranks outnumber its slots, not when the ranks' extra threads do. Where ranks have spare
  # cores (GPU nodes) polling is the lower-latency choice, so it is left alone there.
  if [ $((2 * ranks)) -gt "$cores" ]; then
    export OMPI_MCA_mpi_yield_when_idle=${OMPI_MCA_mpi_yield_when_idle:-1}
  fi
}
