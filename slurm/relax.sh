#!/usr/bin/env bash
# Relax a split (IS2RE/IS2RS) with a trained model: a job array, one GPU per array task, each task relaxing
# its share of the structures with `python -m eqv2.relax` (batched by an atom budget, refilled as
# structures converge).
#
#   sbatch --array=0-15 slurm/relax.sh model.pt /data/is2re/all/val_id/data.lmdb runs/relax/val_id
#   # the task that finishes last writes runs/relax/val_id/{is2rs.npz,is2re.npz,metrics.json}; AFbT afterwards:
#   python -m eqv2.relax --collect runs/relax/val_id --oracle my_dft_module:Calculator
#
# INPUT is anything `eqv2 relax --input` reads: an IS2RE/IS2RS LMDB file or folder, a shard manifest.json,
# an ASE-readable file. Task i of an array of n relaxes structures i, i+n, i+2n, ... of INPUT and writes
# OUT_DIR/results.<i>.jsonl, one line per structure as it finishes, and the structures in flight to
# OUT_DIR/inflight.<i>.pt (every 50 optimizer steps, --checkpoint-every in RELAX_ARGS, and on a stop).
# SIGUSR1 before the time limit (--signal below) or SIGTERM (scancel, preemption) is forwarded as SIGUSR1:
# the task writes its in-flight state and exits 75; after a USR1 the job requeues itself. A requeued,
# preempted or resubmitted task skips what any task already finished and continues the structures that
# were in flight from their saved positions and optimizer state.
#
# Settings (environment):
#   MAX_ATOMS   atom budget per batch                                    (2000)
#   RELAX_ARGS  more `eqv2 relax` options, e.g. "--optimizer fire --steps 200 --trajectories"
#   CALCULATOR  module:Class of an ASE calculator to relax with instead of MODEL (MODEL is then "-")
#   DEVICE      cpu | cuda  (default: cuda if the task has a GPU)
#   PYTHON      interpreter of the environment with eqv2 installed (python)
#
#SBATCH --job-name=eqv2-relax      # job name: shown by squeue, used in the log file names
#SBATCH --nodes=1                  # each array task is one process on one node
#SBATCH --ntasks=1                 # one relaxation process per array task
#SBATCH --gpus-per-task=1          # one GPU per array task; --gpus-per-task=0 for CPU
#SBATCH --cpus-per-task=4          # reading inputs and writing results on the host
#SBATCH --time=04:00:00            # per array task; a requeue continues where it stopped
#SBATCH --requeue                  # safe: finished structures are skipped on a rerun
#SBATCH --signal=B:USR1@120        # SIGUSR1 to this shell 120 s before the time limit: save the in-flight state, requeue
#SBATCH --open-mode=append         # a requeued task appends to its log
#SBATCH --output=%x-%A_%a.out      # one log per array task (%A array job id, %a task index)
set -euo pipefail

EQV2_ROOT=${EQV2_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f $EQV2_ROOT/slurm/lib.sh ]] || { echo "EQV2_ROOT=$EQV2_ROOT is not the eqv2 repository: submit from its root or set EQV2_ROOT" >&2; exit 2; }
# shellcheck source=slurm/lib.sh
source "$EQV2_ROOT/slurm/lib.sh"

(( $# == 3 )) || eqv2_die "usage: sbatch --array=0-<n-1> slurm/relax.sh MODEL.pt INPUT OUT_DIR" 2
INPUT=$(realpath -m "$2") OUT=$(realpath -m "$3")
if [[ -n ${CALCULATOR:-} ]]; then
  force=(--calculator "$CALCULATOR")
else
  MODEL=$(realpath -m "$1")
  [[ -f $MODEL ]] || eqv2_die "model checkpoint $MODEL not found (make one with tools/export_model.py)" 2
  force=(--checkpoint "$MODEL")
fi
[[ -e $INPUT ]] || eqv2_die "input $INPUT not found" 2
task=${SLURM_ARRAY_TASK_ID:-0} ntasks=${SLURM_ARRAY_TASK_COUNT:-1}

device=()
[[ -n ${DEVICE:-} ]] && device=(--device "$DEVICE")
read -r -a extra <<< "${RELAX_ARGS:-}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
mkdir -p "$OUT"
cd "$EQV2_ROOT" || eqv2_die "cannot enter EQV2_ROOT=$EQV2_ROOT" 2
eqv2_log "array task $task of $ntasks: $INPUT -> $OUT/results.$task.jsonl"
eqv2_run_step "${PYTHON:-python}" -m eqv2.relax "${force[@]}" --input "$INPUT" --output "$OUT" --task-index "$task" \
  --num-tasks "$ntasks" --max-atoms "${MAX_ATOMS:-2000}" "${device[@]}" "${extra[@]}"
eqv2_finish_step  # exit 75 after a USR1: requeue (the rerun continues the in-flight structures); else its exit code
eqv2_log "array task $task: done"
