"""The MPI launch paths of slurm/train_all_md.sh: ranks discovered through MPI instead of SLURM's variables.

LAUNCHER=pmi2 runs the step with `srun --mpi=pmi2`; LAUNCHER=mpirun hands the allocation to the MPI
library's launcher (MPICH's hydra, which starts its proxies through srun).  The trainer then finds rank
and world size through mpi4py.  Needs an MPI library that mpi4py can load: the `mpich` wheel from
PyPI provides one (mpi4py's own wheel carries none).
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.slurm.conftest import submit
from tests.slurm.test_train_job import SBATCH, _env, _records

pytestmark = pytest.mark.slurm


def _mpi_problem() -> str | None:
    probe = subprocess.run([sys.executable, "-c", "from mpi4py import MPI; print(MPI.Get_library_version())"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return f"mpi4py cannot load an MPI library (pip install mpich): {probe.stderr.strip().splitlines()[-1:]}"
    if "MPICH" not in probe.stdout:
        return f"these launch tests use MPICH's PMI-2 and hydra; mpi4py loads {probe.stdout.split(chr(10))[0]!r}"
    return None


@pytest.mark.parametrize("launcher", ["pmi2", "mpirun"])
def test_mpi_launch_trains_two_nodes(slurm_cluster, demo_raw, tmp_path, jobs, launcher):
    problem = _mpi_problem()
    if problem:
        pytest.skip(problem)
    run_dir = tmp_path / "run"
    env = {**_env(demo_raw, run_dir), "LAUNCHER": launcher}
    env["TRAIN_ARGS"] = env["TRAIN_ARGS"].replace("optim.max_steps=60", "optim.max_steps=10")
    job = submit("slurm/train_all_md.sh", tmp_path, SBATCH, env)
    jobs.append(job)
    state = job.wait(timeout=180)
    logs = job.logs()
    assert state in ("COMPLETED", "GONE"), f"{launcher} job {state}\n{logs}"
    assert "mpi launch, 2 rank(s) on cpu/gloo" in logs, f"the trainer did not discover its ranks through MPI\n{logs}"
    train, val = _records(run_dir)
    assert max(train) == 10 and val is not None, logs
