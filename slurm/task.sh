#!/usr/bin/env bash
# One training task of an srun step: map SLURM's per-task variables to torch.distributed's, then exec.
# srun starts this once per rank; MASTER_ADDR/MASTER_PORT come from the batch script (slurm/lib.sh).
set -euo pipefail
export RANK=${SLURM_PROCID:?slurm/task.sh runs under srun}
export WORLD_SIZE=${SLURM_NTASKS:?}
export LOCAL_RANK=${SLURM_LOCALID:?}
# Ranks on this node; torchrun exports the same name and some libraries read it.
export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-1}
: "${MASTER_ADDR:?set by the batch script}" "${MASTER_PORT:?set by the batch script}"
exec "$@"
