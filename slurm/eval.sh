#!/usr/bin/env bash
# Predict energies and forces for OC20 validation/test files with a trained model: a job array, one
# GPU per array task, each task predicting its share of the input files with `python -m eqv2.predict`.
#
#   eqv2 export runs/all_md/checkpoints -o runs/all_md/model.pt     # once, EMA weights
#   sbatch --array=0-15 slurm/eval.sh runs/all_md/model.pt /data/oc20/raw/s2ef_val_id runs/all_md/pred_val_id
#
# Task i of an array of n takes the sorted input files i, i+n, i+2n, ... (every *.extxyz, *.extxyz.xz,
# *.xyz, *.traj of INPUT_DIR), so the array may be smaller than the number of files, and writes
# OUT_DIR/<file name>.npz (energy [structures] eV, forces [atoms, 3] eV/Å, natoms), exactly what the
# serial command writes for that file.  Outputs appear atomically (written under a temporary name,
# then renamed), and files whose output exists are skipped, so a requeued or resubmitted array only
# does what is missing.  Predictions are in the units the model was trained on (adsorption energies
# for shards made with --subtract-reference).
#
# Settings (environment):
#   MAX_ATOMS  atom budget per batch for eqv2.predict          (2000)
#   DEVICE     cpu | cuda  (default: cuda if the task has a GPU)
#   PYTHON     interpreter of the environment with eqv2 installed (python)
#
#SBATCH --job-name=eqv2-eval       # job name: shown by squeue, used in the log file names
#SBATCH --nodes=1                  # each array task is one process on one node
#SBATCH --ntasks=1                 # one prediction process per array task
#SBATCH --gpus-per-task=1          # one GPU per array task; --gpus-per-task=0 for CPU
#SBATCH --cpus-per-task=8          # reading and graph construction on the host
#SBATCH --time=02:00:00            # per array task; a requeue continues with the missing files
#SBATCH --requeue                  # safe: finished files are skipped on a rerun
#SBATCH --open-mode=append         # a requeued task appends to its log
#SBATCH --output=%x-%A_%a.out      # one log per array task (%A array job id, %a task index)
set -euo pipefail

EQV2_ROOT=${EQV2_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f $EQV2_ROOT/slurm/lib.sh ]] || { echo "EQV2_ROOT=$EQV2_ROOT is not the eqv2 repository: submit from its root or set EQV2_ROOT" >&2; exit 2; }
# shellcheck source=slurm/lib.sh
source "$EQV2_ROOT/slurm/lib.sh"

(( $# == 3 )) || eqv2_die "usage: sbatch --array=0-<n-1> slurm/eval.sh MODEL.pt INPUT_DIR OUT_DIR" 2
MODEL=$(realpath -m "$1") INPUT=$(realpath -m "$2") OUT=$(realpath -m "$3")
[[ -f $MODEL ]] || eqv2_die "model checkpoint $MODEL not found (make one with eqv2 export)" 2
[[ -d $INPUT ]] || eqv2_die "input directory $INPUT not found" 2
task=${SLURM_ARRAY_TASK_ID:-0} ntasks=${SLURM_ARRAY_TASK_COUNT:-1}
mapfile -t files < <(find "$INPUT" -maxdepth 1 -type f \( -name '*.extxyz' -o -name '*.extxyz.xz' \
                      -o -name '*.xyz' -o -name '*.traj' \) -printf '%f\n' | LC_ALL=C sort)
(( ${#files[@]} > 0 )) || eqv2_die "no *.extxyz, *.extxyz.xz, *.xyz or *.traj files in $INPUT" 2
(( task < ${#files[@]} )) || { eqv2_log "array task $task: no file left for it (${#files[@]} files)"; exit 0; }

device=()
[[ -n ${DEVICE:-} ]] && device=(--device "$DEVICE")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
mkdir -p "$OUT"
cd "$EQV2_ROOT" || eqv2_die "cannot enter EQV2_ROOT=$EQV2_ROOT" 2
done_count=0
for (( i = task; i < ${#files[@]}; i += ntasks )); do
  name=${files[$i]}
  if [[ -f $OUT/$name.npz ]]; then
    eqv2_log "array task $task: $name.npz exists, skipped"
    continue
  fi
  eqv2_log "array task $task: $INPUT/$name -> $OUT/$name.npz"
  "${PYTHON:-python}" -m eqv2.predict --checkpoint "$MODEL" --input "$INPUT/$name" \
    --output "$OUT/.$name.partial.npz" --max-atoms "${MAX_ATOMS:-2000}" "${device[@]}"
  mv -f "$OUT/.$name.partial.npz" "$OUT/$name.npz"
  done_count=$(( done_count + 1 ))
done
eqv2_log "array task $task: predicted $done_count file(s)"
