#!/usr/bin/env bash
# Shard a raw OC20 S2EF download into eqv2 WebDataset shards: a job array, one split per array task.
#
#   SPLITS="all_md/train=all_md 2M/train=s2ef_train_2M val_id=s2ef_val_id" \
#     sbatch --array=0-2 slurm/shard_oc20.sh /data/oc20/raw data/oc20/s2ef
#
# Each SPLITS entry is OUT_NAME=RAW_SUBDIR (or just NAME when both are the same); array task i shards
# RAW/<RAW_SUBDIR i> (all *.extxyz[.xz] under it, recursively, with their *.txt) into OUT/<OUT_NAME i>
# with eqv2 shard, --workers set to its CPUs.  The example writes the layout that
# configs/train/oc20_*.yaml expect (All+MD: put the S2EF-All and MD folders under RAW/all_md/).
# Each output directory is exactly what the serial tool writes for that input (the tool writes in
# sorted source order whatever the worker count, and this script adds nothing of its own), so the
# array only changes where and when the work runs.  A task killed or preempted midway resumes on
# requeue or resubmission: the tool keeps intact shards and completes the rest identically.
#
# Settings (environment):
#   SPLITS      space-separated OUT_NAME=RAW_SUBDIR entries, one per array task (required; --array=0-<n-1>)
#   SHARD_ARGS  arguments for eqv2 shard  ("--shard-bytes 256M --subtract-reference")
#   PYTHON      interpreter of the environment with eqv2 installed (python)
#
#SBATCH --job-name=eqv2-shard       # job name: shown by squeue, used in the log file names
#SBATCH --nodes=1                  # the tool is one process plus a local pool of readers
#SBATCH --ntasks=1                 # one tool run per array task
#SBATCH --cpus-per-task=32         # reader processes (decompressing and parsing extxyz is the cost)
#SBATCH --time=12:00:00            # All+MD is the largest split: ~10^8 structures
#SBATCH --requeue                  # safe: a rerun resumes after the last intact shard
#SBATCH --open-mode=append         # a requeued task appends to its log
#SBATCH --output=%x-%A_%a.out      # one log per array task (%A array job id, %a task index)
set -euo pipefail

EQV2_ROOT=${EQV2_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f $EQV2_ROOT/slurm/lib.sh ]] || { echo "EQV2_ROOT=$EQV2_ROOT is not the eqv2 repository: submit from its root or set EQV2_ROOT" >&2; exit 2; }
# shellcheck source=slurm/lib.sh
source "$EQV2_ROOT/slurm/lib.sh"

(( $# == 2 )) || eqv2_die "usage: SPLITS='a b ...' sbatch --array=0-<n-1> slurm/shard_oc20.sh RAW_DIR OUT_DIR" 2
RAW=$(realpath -m "$1") OUT=$(realpath -m "$2")
read -r -a splits <<<"${SPLITS:-}"
(( ${#splits[@]} > 0 )) || eqv2_die "SPLITS is empty: name the subdirectories of $RAW to shard" 2
task=${SLURM_ARRAY_TASK_ID:?submit as a job array: sbatch --array=0-$(( ${#splits[@]} - 1 ))}
(( task < ${#splits[@]} )) || eqv2_die "array task $task but SPLITS has only ${#splits[@]} entries (${splits[*]})" 2
entry=${splits[$task]}
out_name=${entry%%=*} raw_name=${entry#*=}  # "NAME" alone: both are NAME
[[ -n $out_name && -n $raw_name ]] || eqv2_die "SPLITS entry '$entry' (array task $task): expected OUT_NAME=RAW_SUBDIR" 2
[[ -d $RAW/$raw_name ]] || eqv2_die "SPLITS entry '$entry' (array task $task): directory $RAW/$raw_name not found" 2
read -r -a args <<<"${SHARD_ARGS:---shard-bytes 256M --subtract-reference}"

cd "$EQV2_ROOT" || eqv2_die "cannot enter EQV2_ROOT=$EQV2_ROOT" 2
eqv2_log "array task $task: $RAW/$raw_name -> $OUT/$out_name with ${SLURM_CPUS_PER_TASK:-1} workers"
mkdir -p "$(dirname "$OUT/$out_name")"
# Shard file names carry the output name, '/' replaced: all_md/train -> all_md_train-000000.tar
"${PYTHON:-python}" -m eqv2 shard "$RAW/$raw_name" "$OUT/$out_name" --prefix "${out_name//\//_}" \
  --workers "${SLURM_CPUS_PER_TASK:-1}" --no-progress "${args[@]}"
