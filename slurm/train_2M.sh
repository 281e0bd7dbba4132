#!/usr/bin/env bash
# Train EquiformerV2 on OC20 S2EF-2M (the paper's ablation scale): N nodes x G GPUs, preemption-safe.
# Identical launch logic to slurm/train_all_md.sh (slurm/lib.sh); only the defaults differ.
#
#   cd /path/to/eqv2 && sbatch slurm/train_2M.sh                      # defaults below
#   sbatch --nodes=2 --time=12:00:00 slurm/train_2M.sh               # sbatch flags override #SBATCH
#   RUN_DIR=/scratch/$USER/eqv2/s2ef_2M_83M DS_CONFIG=ds_configs/zero1_bf16.json \
#       TRAIN_ARGS="--set optim.lr=3e-4" sbatch slurm/train_2M.sh     # env overrides the settings
#
# Submit from the repository root (or set EQV2_ROOT): SLURM runs a copy of this file from its spool.
# The run directory is stable across submissions, so resubmitting the same command resumes the run
# from its newest complete checkpoint; use a new RUN_DIR for a new run.  See docs/slurm.md.
#
# Settings (environment):
#   CONFIG         run YAML                        (configs/train/oc20_2M_83M.yaml)
#   DS_CONFIG      DeepSpeed JSON                  (ds_configs/zero0_bf16.json; CPU: ds_configs/cpu_demo.json)
#   RUN_DIR        checkpoints, metrics, configs   (runs/oc20_2M_83M)
#   TRAIN_ARGS     extra trainer arguments, e.g. "--set optim.max_epochs=3 --set data.num_workers=8"
#   GPUS_PER_NODE  GPUs (= ranks) per node; 0 = CPU, one rank per node   (from --gpus-per-node)
#   LAUNCHER       srun (default) | pmix | pmi2 | mpirun                  (see docs/slurm.md, "MPI")
#   PYTHON         interpreter of the environment with eqv2 installed    (python)
#
#SBATCH --job-name=eqv2-2M         # job name: shown by squeue, used in the log file name
#SBATCH --nodes=1                  # upstream trained S2EF-2M on 8 GPUs (global batch 4 x 8 = 32)
#SBATCH --ntasks-per-node=8        # one task per GPU (the srun step below sets its own layout)
#SBATCH --gpus-per-node=8          # GPUs per node; 0 selects the CPU fallback
#SBATCH --cpus-per-task=12         # per rank: trainer + data.num_workers readers; at most cores per node / 8
#SBATCH --time=24:00:00            # per allocation; the run continues across requeues past this
#SBATCH --requeue                  # allow this job to be put back in the queue (preemption, self-requeue)
#SBATCH --signal=B:USR1@180        # SIGUSR1 to the batch shell 180 s before the time limit: checkpoint, requeue
#SBATCH --open-mode=append         # a requeued run appends to the same log instead of truncating it
#SBATCH --output=%x-%j.out         # one log per job id (all its restarts), in the submission directory
#SBATCH --exclusive                # whole nodes: NCCL and the data readers need all cores and NICs
# From the first line on, record SIGUSR1/SIGTERM (bash's default for USR1 is to exit, which would end
# the job without a requeue); lib.sh's handlers take over once sourced and act on a recorded signal.
trap 'STEP_SIGNAL=USR1' USR1
trap 'STEP_SIGNAL=${STEP_SIGNAL:-TERM}' TERM
echo "[$(date '+%F %T')] job ${SLURM_JOB_ID:-?}: batch shell started (restart ${SLURM_RESTART_COUNT:-0})" >&2
set -euo pipefail

EQV2_ROOT=${EQV2_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f $EQV2_ROOT/slurm/lib.sh ]] || { echo "EQV2_ROOT=$EQV2_ROOT is not the eqv2 repository: submit from its root or set EQV2_ROOT" >&2; exit 2; }
# shellcheck source=slurm/lib.sh
source "$EQV2_ROOT/slurm/lib.sh"

CONFIG=${CONFIG:-configs/train/oc20_2M_83M.yaml}
RUN_DIR=${RUN_DIR:-runs/oc20_2M_83M}
eqv2_train "$CONFIG" "$RUN_DIR" ds_configs/zero0_bf16.json
