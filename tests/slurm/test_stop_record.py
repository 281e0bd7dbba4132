"""slurm/lib.sh's requeue decision reads the trainer's stop record (docs/slurm.md, "Preemption").

The launcher's exit code alone does not say whether the trainer stopped cleanly: torchrun returns 1
when its workers exit 75, a signalled deepspeed runner 143 or 138.  A complete stop record
(`<run_dir>/stopped.json`, written by rank 0 after the stop checkpoint) makes the step count as exit
75; a stale one (its checkpoint no longer the newest) or one whose checkpoint is incomplete does not.

These run lib.sh's own functions in bash (no SLURM needed: eqv2_finish_step reads only the step's
exit code, the signal the batch shell got and the run directory; eqv2_train runs with LAUNCHER=mpirun).
The record is written by the trainer's own code, after a real signal.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from eqv2.training.signals import STOP_RECORD, StopFlag
from tests.slurm.conftest import REPO
from tests.train.conftest import free_port


def _run_dir(tmp_path: Path, latest: int, stopped: int | None, complete: bool = True) -> Path:
    """A run directory whose newest checkpoint is `latest`, with the stop record of step `stopped`."""
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    for step in {latest, stopped} - {None}:
        (ckpt_dir / f"step_{step:08d}").mkdir(parents=True)
        if complete or step != stopped:
            (ckpt_dir / f"step_{step:08d}" / "COMPLETE").write_text("{}\n")
    (ckpt_dir / "latest").write_text(f"step_{latest:08d}\n")
    if stopped is not None:
        flag = StopFlag().install(watch_launcher=False)
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
        finally:
            flag.restore()
        assert flag.reason == "SIGUSR1"
        flag.write_record(run_dir, stopped, f"step_{stopped:08d}", is_main=True)
    return run_dir


def _finish(run_dir: Path, step_rc: int, step_signal: str = "") -> subprocess.CompletedProcess:
    script = f"""set -euo pipefail
source {REPO / 'slurm' / 'lib.sh'}
STEP_SIGNAL={step_signal}
STEP_RC={step_rc}
eqv2_finish_step {run_dir / 'checkpoints' / 'latest'} {run_dir / STOP_RECORD}
echo "finish_step returned"
"""
    # SLURM_JOB_ID=0: where scontrol exists, the requeue of a job that does not exist fails harmlessly
    env = {**os.environ, "SLURM_JOB_ID": "0", "SLURM_RESTART_COUNT": "0"}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("launcher_rc", [1, 143, 138], ids=["torchrun", "deepspeed-TERM", "deepspeed-USR1"])
def test_a_complete_stop_record_counts_as_exit_75(tmp_path, launcher_rc):
    run_dir = _run_dir(tmp_path, latest=7, stopped=7)
    proc = _finish(run_dir, launcher_rc)
    assert proc.returncode == 75, proc.stderr
    assert f"the launcher returned {launcher_rc}, but the trainer stopped after checkpoint step_00000007" in proc.stderr
    assert "step checkpointed and stopped" in proc.stderr


def test_after_sigusr1_a_complete_stop_record_requeues(tmp_path):
    """torchrun's 1 after the batch shell forwarded SIGUSR1: the job requeues (here scontrol is absent
    or refuses job 0, so the script then says so and exits 75; the decision is the logged line)."""
    proc = _finish(_run_dir(tmp_path, latest=7, stopped=7), 1, "USR1")
    assert "step stopped for preemption (exit 75): requeueing (restart 1)" in proc.stderr, proc.stderr
    assert proc.returncode == 75, proc.stderr


@pytest.mark.parametrize("latest, stopped, complete", [(8, 4, True), (7, 7, False), (7, None, True)],
                         ids=["stale", "incomplete-checkpoint", "no-record"])
def test_without_a_current_complete_record_the_launcher_code_stands(tmp_path, latest, stopped, complete):
    proc = _finish(_run_dir(tmp_path, latest, stopped, complete), 1, "USR1")
    assert proc.returncode == 1, proc.stderr
    assert "step failed with exit 1" in proc.stderr and "requeueing" not in proc.stderr


def test_a_finished_step_still_finishes(tmp_path):
    proc = _finish(_run_dir(tmp_path, latest=8, stopped=None), 0)
    assert proc.returncode == 0 and "step finished" in proc.stderr and "finish_step returned" in proc.stdout


def test_eqv2_train_removes_an_earlier_launch_s_record(tmp_path, demo_raw):
    """The whole launch of train_all_md.sh outside SLURM (LAUNCHER=mpirun, one rank): an earlier
    launch stopped at step 7 and left its record; this launch's trainer fails on the damaged step-7
    checkpoint before it trains.  The old record must not turn that failure into a clean stop."""
    run_dir = _run_dir(tmp_path, latest=7, stopped=7)  # checkpoint files missing: the trainer refuses it
    args = [f"--set data.train_manifest={demo_raw}/train/manifest.json",
            f"--set data.val_manifest={demo_raw}/val/manifest.json"]
    env = {**os.environ, "EQV2_ROOT": str(REPO), "PYTHON": sys.executable, "LAUNCHER": "mpirun",
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
           "NNODES": "1", "GPUS_PER_NODE": "0", "SLURM_JOB_ID": "0", "SLURM_JOB_NODELIST": "localhost",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "compile_cache"),
           "DS_CONFIG": "tests/slurm/ds_zero2_cpu.json", "TRAIN_ARGS": " ".join(args)}
    script = f"""set -euo pipefail
source {REPO / 'slurm' / 'lib.sh'}
eqv2_train tests/slurm/tiny_run.yaml {run_dir} ds_configs/cpu_demo.json
"""
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "step_00000007/trainer_state.json" in out, out[-4000:]  # exit 2: not requeued
    assert "taking it as exit 75" not in out and not (run_dir / STOP_RECORD).exists(), out[-4000:]
