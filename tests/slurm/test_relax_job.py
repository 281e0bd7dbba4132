"""slurm/relax.sh: an array of two tasks relaxes a set split between them; the collected results equal a
serial `eqv2 relax`, a resubmitted array redoes nothing; a task preempted
with SIGUSR1 requeues and continues its in-flight structures."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from eqv2.relaxation.results import load_results
from tests.relaxation.emt_set import ase_relax, initial_atoms, structure_of, write_is2r_extxyz
from tests.slurm.conftest import REPO, submit

pytestmark = pytest.mark.slurm
EMT = "ase.calculators.emt:EMT"


def test_relax_array_matches_serial(slurm_cluster, tmp_path, jobs):
    data = tmp_path / "set.extxyz"
    atoms = [initial_atoms(i) for i in range(6)]
    write_is2r_extxyz(data, [structure_of(a, target=ase_relax(a, 0.02, 300)[0]) for a in atoms])
    out = tmp_path / "relax"
    env = {"DEVICE": "cpu", "CALCULATOR": EMT, "RELAX_ARGS": "--max-structures 2"}
    sbatch = ["--array=0-1", "--gpus-per-task=0", "--cpus-per-task=1", "--time=5"]
    job = submit("slurm/relax.sh", tmp_path, sbatch, env, script_args=("-", str(data), str(out)))
    jobs.append(job)
    job.wait(timeout=240)
    assert sorted(p.name for p in out.glob("results.*.jsonl")) == ["results.0.jsonl", "results.1.jsonl"], job.logs()
    run_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    assert (out / "metrics.json").exists(), job.logs()  # the task that finished last collected
    serial = tmp_path / "serial"
    subprocess.run([sys.executable, "-m", "eqv2.relax", "--calculator", EMT, "--input", str(data), "--output", str(serial),
                    "--max-structures", "2"], check=True, cwd=REPO, env=run_env, timeout=300, capture_output=True)
    got, want = load_results(out), load_results(serial)
    assert sorted(got) == sorted(want) and len(got) == 6
    for sid in want:  # other batch partners: the same arithmetic up to the order of float sums
        np.testing.assert_allclose(got[sid].positions, want[sid].positions, atol=1e-9)
        assert got[sid].steps == want[sid].steps
    m_got, m_want = (json.loads((d / "metrics.json").read_text()) for d in (out, serial))
    for task in ("is2re", "is2rs"):
        assert m_got[task] == pytest.approx(m_want[task], abs=1e-9)

    again = submit("slurm/relax.sh", tmp_path, sbatch, env, script_args=("-", str(data), str(out)))
    jobs.append(again)
    again.wait(timeout=180)
    assert again.logs().count("relaxed 0 structures") == 2 and "3 already done" in again.logs(), again.logs()


def test_preempted_relax_task_requeues_and_continues(slurm_cluster, tmp_path, jobs):
    """USR1 to the batch shell (what `--signal=B:USR1@120` delivers before the time limit) while structures
    are in flight: the task saves them and exits 75, the job requeues itself, and the requeued task continues
    them from their saved state: the results equal an uninterrupted serial run's."""
    import time

    data = tmp_path / "set.extxyz"
    write_is2r_extxyz(data, [structure_of(a, target=ase_relax(a, 0.5, 2)[0]) for a in map(initial_atoms, range(6))])
    out = tmp_path / "relax"
    # a tight fmax: hundreds of steps per structure, long enough for the signal to land mid-run
    args = "--max-structures 3 --fmax 1e-9 --steps 400 --checkpoint-every 5"
    env = {"DEVICE": "cpu", "CALCULATOR": EMT, "RELAX_ARGS": args}
    sbatch = ["--gpus-per-task=0", "--cpus-per-task=1", "--time=5"]
    job = submit("slurm/relax.sh", tmp_path, sbatch, env, script_args=("-", str(data), str(out)))
    jobs.append(job)
    deadline = time.monotonic() + 120
    while not (out / "inflight.0.pt").exists():
        assert time.monotonic() < deadline and job.state() not in ("COMPLETED", "FAILED"), job.logs()
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.job_id], check=True, timeout=15)
    state = job.wait(timeout=240)
    logs = job.logs()
    assert state in ("COMPLETED", "GONE"), f"preempted relax job ended {state}\n{logs}"
    assert "stopped on SIGUSR1; in-flight state in" in logs, logs
    assert "(exit 75): requeueing (restart 1)" in logs, logs
    assert "3 continued from" in logs, logs  # the batch of 3 in flight at the signal
    run_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    serial = tmp_path / "serial"
    subprocess.run([sys.executable, "-m", "eqv2.relax", "--calculator", EMT, "--input", str(data), "--output", str(serial),
                    *args.split()], check=True, cwd=REPO, env=run_env, timeout=300, capture_output=True)
    got, want = load_results(out), load_results(serial)
    assert sorted(got) == sorted(want) and len(got) == 6
    for sid in want:
        np.testing.assert_allclose(got[sid].positions, want[sid].positions, atol=1e-9)
        assert got[sid].steps == want[sid].steps
