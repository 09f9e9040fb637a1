# shellcheck shell=bash
# Helpers of launch/slurm.sbatch (sourced; they use its variables and its die/say): what SLURM
# says about this job, and what to do when the training stopped to be requeued (status 3: its
# checkpoint, if it made a step, is written).
#
# What SLURM 22.05 reports, measured on a real single-node cluster (launch/slurm/README.md), in
# `scontrol show job -o` while the batch script still runs after the training stopped:
#   USR1 warning, or a signal by hand:      JobState=RUNNING     Reason=None       Restarts=R
#   time limit (SIGTERM, no warning):       JobState=COMPLETING  Reason=TimeLimit  Restarts=R
#   scancel JOBID:                          JobState=COMPLETING  Reason=None       Restarts=R
#   scontrol requeue JOBID (admin),
#   preemption with PreemptMode=REQUEUE:    JobState=COMPLETING  Reason=None       Restarts=R+1
#   preemption with GraceTime, in the grace: JobState=RUNNING    Reason=None       Restarts=R
# where R is the count when the job started. So "SLURM already requeued it" is a Restarts count
# that went up, and "cancelled" is a job that is ending for no reason of its own (not
# RUNNING, not TimeLimit). `scontrol requeue` of a cancelled job succeeds (the job comes back
# about two minutes later), which is why the script must never run it blindly.

job_state="" job_reason="" job_restarts="" job_stdout=""

# Fills job_state, job_reason, job_restarts, job_stdout (empty when scontrol does not answer).
read_job_state() {
  local info field
  info=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null) || info=""
  for field in JobState Reason Restarts StdOut; do
    local value
    value=$(grep -o "\(^\| \)$field=[^ ]*" <<<"$info" | head -n 1 | sed "s/^ *$field=//") || true
    case $field in
      JobState) job_state=$value ;;
      Reason) job_reason=$value ;;
      Restarts) [[ $value =~ ^[0-9]+$ ]] && job_restarts=$value || job_restarts="" ;;
      StdOut) job_stdout=$value ;;
    esac
  done
}

# Seconds in squeue's %L format ([days-]hours:minutes:seconds, minutes:seconds); empty if unknown.
to_seconds() {
  local t=$1 days=0 h=0 m=0 s=0
  [[ $t =~ ^([0-9]+-)?([0-9]+:)?([0-9]+):([0-9]+)$ ]] || return 0
  days=${BASH_REMATCH[1]%-} h=${BASH_REMATCH[2]%:} m=${BASH_REMATCH[3]} s=${BASH_REMATCH[4]}
  echo $(((10#${days:-0} * 24 + 10#${h:-0}) * 3600 + 10#$m * 60 + 10#$s))
}

# A slot that leaves no time before the warning is refused; one that leaves about the start-up
# time only is warned about (each requeue would start up, make a few steps and stop again).
check_time_left() {
  local left window
  left=$(to_seconds "$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null || true)")
  [ -n "$left" ] || return 0 # UNLIMITED, or squeue did not answer
  # SLURM sends the warning up to 60 s before WARN_SECONDS (sbatch(1), --signal).
  window=$((left - WARN_SECONDS - (WARN_SECONDS > 0 ? 60 : 0)))
  if [ "$window" -le 0 ]; then
    die "the job has $left s left and the --signal warning comes $WARN_SECONDS s (up to" \
      "$((WARN_SECONDS + 60)) s) before the end: no time to train; raise --time or lower the" \
      "@SECONDS of --signal=B:USR1@$WARN_SECONDS (and WARN_SECONDS if you pass it to sbatch)"
  fi
  if [ "$window" -lt $((STARTUP_SECONDS + 60)) ]; then
    say "warning: only about $window s between the start and the checkpoint request" \
      "(--time leaves $left s, --signal=B:USR1@$WARN_SECONDS), and start-up takes about" \
      "$STARTUP_SECONDS s (STARTUP_SECONDS): each job makes little progress before it is" \
      "requeued; raise --time or lower the @SECONDS of --signal"
  fi
}

# The run folder gets a link to this job's output file (named by --output, under logs/).
link_output() {
  local dir=$1
  [ -n "$job_stdout" ] && [ -f "$job_stdout" ] || return 0
  mkdir -p "$dir" && ln -sfn "$job_stdout" "$dir/slurm-$SLURM_JOB_ID.out" 2>/dev/null || true
}

# The training stopped to be requeued (status 3); $1: the job's Restarts count at its start.
requeue_or_not() {
  local started=$1
  read_job_state
  if [ -n "$job_restarts" ] && [ "$job_restarts" -gt "$started" ]; then
    say "SLURM has already requeued job $SLURM_JOB_ID (scontrol requeue, or preemption):" \
      "it resumes from the checkpoint in $log_dir when it runs again; nothing to submit"
    exit 0
  fi
  if [ -z "$job_state" ]; then
    say "training stopped to be requeued (status $status), but scontrol does not answer: not" \
      "requeueing (the job may have been cancelled); once 'squeue -j $SLURM_JOB_ID' no" \
      "longer lists it, sbatch -J $job_name resumes from $log_dir"
    exit "$REQUEUE_EXIT_STATUS"
  fi
  if [ "$job_state" != RUNNING ] && [ "$job_reason" != TimeLimit ]; then
    say "job $SLURM_JOB_ID was cancelled (JobState=$job_state Reason=$job_reason): not" \
      "requeueing; its checkpoint stays in $log_dir"
    exit "$REQUEUE_EXIT_STATUS"
  fi
  if [ "$started" -ge "$MAX_REQUEUES" ]; then
    say "training stopped to be requeued (status $status), but the job was already requeued" \
      "$started times (MAX_REQUEUES=$MAX_REQUEUES): not requeueing; once it has ended," \
      "sbatch -J $job_name resumes from $log_dir (or raise MAX_REQUEUES)"
    exit "$REQUEUE_EXIT_STATUS"
  fi
  say "training stopped to be requeued (status $status): requeueing job $SLURM_JOB_ID" \
    "(JobState=$job_state Reason=$job_reason, restart $((started + 1)) of at most $MAX_REQUEUES)"
  if scontrol requeue "$SLURM_JOB_ID"; then
    exit 0
  fi
  read_job_state
  if [ -n "$job_restarts" ] && [ "$job_restarts" -gt "$started" ]; then
    say "SLURM requeued job $SLURM_JOB_ID meanwhile: it resumes from $log_dir; nothing to submit"
    exit 0
  fi
  say "scontrol requeue $SLURM_JOB_ID failed (was the job submitted with --requeue? does the" \
    "cluster allow requeues, JobRequeue?): once it has ended, sbatch -J $job_name resumes" \
    "from $log_dir"
  exit "$REQUEUE_EXIT_STATUS"
}
