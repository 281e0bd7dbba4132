# Shared by the slurm/*.sh batch scripts (sourced, not run).  Bash only; expects `set -euo pipefail`.
#
# The batch scripts are copied into slurmd's spool directory before they run, so they cannot find
# this file relative to themselves: they locate the repository through EQV2_ROOT, else the
# directory sbatch was called from (SLURM_SUBMIT_DIR).

EQV2_EXIT_OK=0       # eqv2/train.py: training finished
EQV2_EXIT_CONFIG=2   # eqv2/train.py: bad config or input; never requeued (it would fail again)
EQV2_EXIT_REQUEUE=75 # eqv2/train.py: stopped on SIGUSR1/SIGTERM after saving a checkpoint

eqv2_log() { echo "[$(date '+%F %T')] ${SLURM_JOB_ID:+job $SLURM_JOB_ID: }$*" >&2; }
eqv2_die() { eqv2_log "error: $1"; exit "${2:-1}"; }  # $1 message, $2 exit code (default 1)

# Nodes, tasks per node and devices of this allocation, for the training step.
#   GPUS_PER_NODE  GPUs per node to use (default: SLURM_GPUS_PER_NODE, e.g. from --gpus-per-node=8;
#                  0 = CPU fallback with one rank per node and the gloo backend)
eqv2_layout() {
  local g=${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-0}}
  g=${g##*:}  # --gpus-per-node=a100:8 -> 8
  [[ $g =~ ^[0-9]+$ ]] || eqv2_die "GPUS_PER_NODE must be a number, got '$g'" 2
  GPUS_PER_NODE=$g
  NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:?not inside a SLURM allocation (submit with sbatch)}}
  TASKS_PER_NODE=$(( g > 0 ? g : 1 ))
  WORLD_SIZE=$(( NNODES * TASKS_PER_NODE ))
  CPUS_PER_TASK=${CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-1}}
}

# Rendezvous for torch.distributed, shared by every task of the job: rank 0 runs on the first host
# of the node list, and the port is derived from the job id so that two jobs sharing a node never
# collide (a requeued job keeps its id, hence its port).
eqv2_rendezvous() {
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
  MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
  export MASTER_ADDR MASTER_PORT
  # One process per core given to the task: oversubscribed OpenMP threads slow CPU runs severalfold.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS_PER_TASK}
}

# NCCL/torch settings for multi-node GPU runs; each only if the user has not set it.  Sites usually
# also need NCCL_SOCKET_IFNAME (the interface for bootstrap, e.g. ib0 or eth0) and, with several
# InfiniBand adapters, NCCL_IB_HCA; set those in the environment before sbatch.
eqv2_nccl_env() {
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}  # INFO prints the chosen transports: use it once per new cluster
  # A rank that dies makes the others raise instead of waiting forever in a collective, so that
  # srun --kill-on-bad-exit ends the job instead of burning the allocation.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
}

# torch.compile's on-disk caches (Inductor's compiled FX graphs and AOTAutograd artifacts, Triton
# kernels, autotuning results) on the shared file system instead of each node's /tmp, unless the user set
# TORCHINDUCTOR_CACHE_DIR: EQV2_COMPILE_CACHE, by default `compile_cache` beside the run directory (in its
# parent), so that a requeued or resubmitted job, which may land on other nodes, and any other run of the
# same config under the same parent load their compiled graphs instead of compiling them again (on one H200
# a warm cache cut the 153M trainer's first 20 steps from ~250 s to ~80 s; docs/perf-notes.md, session 12;
# each run's startup.json counts the cache's hits and misses).  Entries are keyed by graph, torch version and
# device, and written by rename, so ranks, nodes and runs can share the directory; on a file system that
# is slow with many small files, point EQV2_COMPILE_CACHE at node-local disk instead.
eqv2_compile_cache() {
  export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${EQV2_COMPILE_CACHE:-$(dirname "$1")/compile_cache}}
  mkdir -p "$TORCHINDUCTOR_CACHE_DIR"
}

# The launcher for one task per rank.  LAUNCHER=srun (default) maps SLURM's variables to torch's in
# slurm/task.sh; LAUNCHER=pmix|pmi2 runs the same step through SLURM's MPI plugin and lets the trainer
# discover ranks through mpi4py; LAUNCHER=mpirun hands the allocation to the MPI library's own launcher.
eqv2_launcher() {
  local common=(--nodes="$NNODES" --ntasks="$WORLD_SIZE" --ntasks-per-node="$TASKS_PER_NODE"
                --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 --label)
  case ${LAUNCHER:-srun} in
    srun) LAUNCH=(srun "${common[@]}" "$EQV2_ROOT/slurm/task.sh") ;;
    pmix|pmi2) LAUNCH=(srun "${common[@]}" --mpi="$LAUNCHER") ;;
    mpirun)  # per-node placement flags differ between the two common MPI libraries
      if mpirun --version 2>&1 | grep -q "Open MPI"; then
        LAUNCH=(mpirun -np "$WORLD_SIZE" --map-by "ppr:$TASKS_PER_NODE:node")
      else
        LAUNCH=(mpirun -np "$WORLD_SIZE" -ppn "$TASKS_PER_NODE")  # MPICH / Intel MPI (hydra)
      fi ;;
    *) eqv2_die "LAUNCHER must be srun, pmix, pmi2 or mpirun, got '$LAUNCHER'" 2 ;;
  esac
}

# Run "$@" as one distributed step and wait for it, handling preemption.
#
# SIGUSR1 to this batch shell (from `#SBATCH --signal=B:USR1@180` before the time limit, or
# `scancel --signal=USR1 --batch`): forward it to the tasks, which checkpoint at the next step boundary
# and exit 75; then requeue this job, which reruns this script with the same job id and run dir, and
# `--resume auto` continues from that checkpoint.
# SIGTERM (scancel, preemption, `scontrol requeue`, the time limit itself): forward it as SIGUSR1 too
# (srun answers its own SIGTERM by killing the tasks) so the tasks still checkpoint within KillWait,
# but do not requeue: a cancelled job must stay cancelled, and preemption/admin requeues are SLURM's.
# A signal that arrives before the step exists (while the configs are checked, say) is remembered:
# the step is then not started, and a USR1 still requeues the job.
# Sets STEP_RC (the step's exit code) and STEP_SIGNAL (USR1, TERM or empty).
eqv2_run_step() {
  if [[ -n $STEP_SIGNAL ]]; then
    eqv2_log "not starting the step: SIG$STEP_SIGNAL arrived first"
    STEP_RC=$(( 128 + 10 ))  # as for a task killed by SIGUSR1 during start-up: nothing ran, nothing saved
    return 0
  fi
  "$@" &
  _EQV2_STEP_PID=$!
  # A signal handled between the fork and the line above found no pid to forward to.
  [[ -n $STEP_SIGNAL ]] && { kill -USR1 "$_EQV2_STEP_PID" 2>/dev/null || true; }
  # `wait` returns early whenever a trapped signal arrives; keep waiting until the step is gone.
  while kill -0 "$_EQV2_STEP_PID" 2>/dev/null; do wait "$_EQV2_STEP_PID" || true; done
  STEP_RC=0
  wait "$_EQV2_STEP_PID" || STEP_RC=$?
  _EQV2_STEP_PID=""
}

_eqv2_forward() {
  [[ -n $STEP_SIGNAL && $STEP_SIGNAL == "$1" ]] && return 0  # repeated signal: already forwarded
  [[ $STEP_SIGNAL == USR1 ]] || STEP_SIGNAL=$1                 # USR1 (requeue wish) wins over TERM
  if [[ -z $_EQV2_STEP_PID ]]; then
    eqv2_log "got SIG$1 while no step is running"
    return 0
  fi
  eqv2_log "got SIG$1: asking the tasks to checkpoint and stop"
  kill -USR1 "$_EQV2_STEP_PID" 2>/dev/null || true
}

# Installed as soon as a batch script sources this file: bash's default for SIGUSR1 is to exit,
# which would end the job without a requeue if the signal came before the step.  A signal the batch
# script recorded before sourcing this file (its first-line traps) is kept.
STEP_SIGNAL=${STEP_SIGNAL:-}
_EQV2_STEP_PID=""
trap '_eqv2_forward USR1' USR1
trap '_eqv2_forward TERM' TERM

# Whether the trainer's stop record $1 (<run_dir>/stopped.json, written by rank 0 once its stop
# checkpoint is complete, see eqv2/training/signals.py) is complete and current: it names a tag that
# has its COMPLETE marker and that checkpoints/latest still names.  Sets EQV2_STOP_TAG.
eqv2_stop_recorded() {
  local record=$1 ckpt_dir re='"tag": *"(step_[0-9]+)"' text
  ckpt_dir=$(dirname "$record")/checkpoints
  EQV2_STOP_TAG=""
  [[ -f $record && -f $ckpt_dir/latest ]] || return 1
  text=$(<"$record")
  [[ $text =~ $re ]] || return 1
  [[ -f $ckpt_dir/${BASH_REMATCH[1]}/COMPLETE && $(<"$ckpt_dir/latest") == "${BASH_REMATCH[1]}" ]] || return 1
  EQV2_STOP_TAG=${BASH_REMATCH[1]}
}

# After eqv2_run_step: requeue on a USR1 stop, else pass the step's exit code on.
#   $1  the run's checkpoints/latest file (read before the step), to tell progress from a loop
#   $2  the run's stop record (removed before the step): when it is complete the trainer stopped
#       cleanly after a checkpoint, and the step counts as exit 75 whatever the launcher returned
#       (torchrun returns 1 when its workers exit 75; a signalled deepspeed runner 128 + signal)
eqv2_finish_step() {
  local latest_file=${1:-} record=${2:-} latest_now=""
  if [[ -n $record ]] && (( STEP_RC != EQV2_EXIT_REQUEUE )) && eqv2_stop_recorded "$record"; then
    eqv2_log "the launcher returned $STEP_RC, but the trainer stopped after checkpoint $EQV2_STOP_TAG" \
             "($record): taking it as exit $EQV2_EXIT_REQUEUE"
    STEP_RC=$EQV2_EXIT_REQUEUE
  fi
  [[ -n $latest_file && -f $latest_file ]] && latest_now=$(<"$latest_file")
  if [[ $STEP_SIGNAL == USR1 ]] && (( STEP_RC > 128 )) && (( ${SLURM_RESTART_COUNT:-0} > 0 )) \
     && [[ $latest_now == "${EQV2_LATEST_AT_START:-}" ]]; then
    # Killed by the signal during start-up again, with no checkpoint written since the last
    # restart: a time limit shorter than the --signal margin would requeue this job forever.
    eqv2_log "signal arrived during start-up again and no checkpoint was written: not requeueing" \
             "(is --time longer than the --signal=B:USR1@<seconds> margin?)"
    exit "$STEP_RC"
  fi
  if [[ $STEP_SIGNAL == USR1 ]] && (( STEP_RC == EQV2_EXIT_REQUEUE || STEP_RC > 128 )); then
    # >128: a task died of the signal before the trainer had installed its handler (during start-up);
    # requeueing is still right, `--resume auto` starts from the newest complete checkpoint.
    eqv2_log "step stopped for preemption (exit $STEP_RC): requeueing (restart $(( ${SLURM_RESTART_COUNT:-0} + 1 )))"
    scontrol requeue "$SLURM_JOB_ID" || eqv2_die "scontrol requeue failed; resubmit to resume" "$STEP_RC"
    exit 0
  fi
  if (( STEP_RC == EQV2_EXIT_OK )); then
    eqv2_log "step finished"
    return 0
  fi
  case $STEP_RC in
    "$EQV2_EXIT_REQUEUE") eqv2_log "step checkpointed and stopped on SIG${STEP_SIGNAL:-?}; resubmit to resume" ;;
    "$EQV2_EXIT_CONFIG") eqv2_log "step failed: bad config or input (exit 2), see the messages above" ;;
    *) eqv2_log "step failed with exit $STEP_RC; a resubmission resumes from the last complete checkpoint" ;;
  esac
  exit "$STEP_RC"
}

# Record what this launch ran: the job id, restart count, node list, git commit and environment.
eqv2_stamp_dir() {
  local dir=$1/jobs/${SLURM_JOB_ID}.${SLURM_RESTART_COUNT:-0}
  mkdir -p "$dir"
  {
    echo "job_id: $SLURM_JOB_ID"
    echo "restart: ${SLURM_RESTART_COUNT:-0}"
    echo "job_name: ${SLURM_JOB_NAME:-}"
    echo "nodes: $SLURM_JOB_NODELIST"
    echo "world_size: $WORLD_SIZE ($NNODES nodes x $TASKS_PER_NODE tasks, $GPUS_PER_NODE GPUs/node)"
    echo "launcher: ${LAUNCHER:-srun}"
    echo "master: $MASTER_ADDR:$MASTER_PORT"
    echo "git: $(git -C "$EQV2_ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "started: $(date --iso-8601=seconds)"
  } >"$dir/job.txt"
  env | grep -E '^(SLURM_|NCCL_|TORCH_|TORCHINDUCTOR_|OMP_|MASTER_|CUDA_)' | sort >"$dir/env.txt" || true
  echo "$dir"
}

# The whole training launch of train_all_md.sh / train_2M.sh.
#   $1 run YAML, $2 run directory, $3 ds_config used when GPUs are present (DS_CONFIG overrides;
#   without GPUs the default is ds_configs/cpu_demo.json).  TRAIN_ARGS: extra trainer arguments
#   (whitespace-separated), placed after `--resume auto` so that an explicit --resume wins.
eqv2_train() {
  local config=$1 run_dir=$2 gpu_ds=$3 stamp extra=()
  cd "$EQV2_ROOT" || eqv2_die "cannot enter EQV2_ROOT=$EQV2_ROOT" 2
  eqv2_layout
  if (( GPUS_PER_NODE > 0 )); then DS_CONFIG=${DS_CONFIG:-$gpu_ds}; else DS_CONFIG=${DS_CONFIG:-ds_configs/cpu_demo.json}; fi
  PYTHON=${PYTHON:-python}
  [[ -f $config ]] || eqv2_die "CONFIG=$config: file not found (relative to $EQV2_ROOT)" 2
  [[ -f $DS_CONFIG ]] || eqv2_die "DS_CONFIG=$DS_CONFIG: file not found (relative to $EQV2_ROOT)" 2
  read -r -a extra <<<"${TRAIN_ARGS:-}"
  run_dir=$(realpath -m "$run_dir")
  mkdir -p "$run_dir"
  eqv2_rendezvous
  eqv2_nccl_env
  eqv2_compile_cache "$run_dir"
  eqv2_launcher
  stamp=$(eqv2_stamp_dir "$run_dir")
  local train=(eqv2/train.py --ds_config "$DS_CONFIG" --config "$config" --set "run_dir=$run_dir"
               --resume auto "${extra[@]}")
  "$PYTHON" -m slurm.resolve_config --out "$stamp" --world-size "$WORLD_SIZE" "${train[@]:1}" \
    || eqv2_die "configuration rejected (see above); nothing was launched" 2
  eqv2_log "restart ${SLURM_RESTART_COUNT:-0}: $WORLD_SIZE ranks ($NNODES nodes x $TASKS_PER_NODE) on" \
           "$SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $run_dir"
  EQV2_LATEST_AT_START=""
  [[ -f $run_dir/checkpoints/latest ]] && EQV2_LATEST_AT_START=$(<"$run_dir/checkpoints/latest")
  rm -f "$run_dir/stopped.json"  # an earlier launch's: only this step's trainer may leave one
  eqv2_run_step "${LAUNCH[@]}" "$PYTHON" -u "${train[@]}"
  # The trainer's own resolved copies (normalisers filled in from the data) for this launch.
  cp -f "$run_dir/config.yaml" "$stamp/trained_config.yaml" 2>/dev/null || true
  cp -f "$run_dir/ds_config.json" "$stamp/trained_ds_config.json" 2>/dev/null || true
  eqv2_finish_step "$run_dir/checkpoints/latest" "$run_dir/stopped.json"
}
