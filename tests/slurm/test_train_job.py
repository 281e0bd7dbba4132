"""slurm/train_all_md.sh on the CI cluster: 2 emulated nodes x 1 CPU rank, the tiny run of tiny_run.yaml.

One uninterrupted run is the reference; a run preempted by SIGUSR1 (checkpoint, self-requeue, resume)
and a run whose rank is SIGKILLed (job fails, resubmission resumes) must end with the same losses
and validation metrics, step for step.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm.conftest import REPO, Job, submit

pytestmark = pytest.mark.slurm

MAX_STEPS = 60
CKPT_EVERY = 4  # also mid-epoch: a resume must continue each rank's data stream where it stopped
# 1 CPU per rank (OMP_NUM_THREADS follows it): two ranks with two threads each on 2 cores run 5x slower.
SBATCH = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
LOSS_KEYS = ("loss", "energy_mae_norm", "force_l2mae_norm")
VAL_KEYS = ("energy_mae", "forces_mae", "forces_cos", "num_structures")


def _env(demo: Path, run_dir: Path) -> dict[str, str]:
    args = [f"--set data.train_manifest={demo}/train/manifest.json",
            f"--set data.val_manifest={demo}/val/manifest.json",
            f"--set optim.max_steps={MAX_STEPS}", f"--set checkpoint.every_steps={CKPT_EVERY}"]
    # ZeRO-2: the optimizer state is partitioned over the two "nodes", so a resume must restore each
    # rank's own shard, as in the production ds_configs (which add bf16 autocast, a GPU matter).
    return {"CONFIG": "tests/slurm/tiny_run.yaml", "DS_CONFIG": "tests/slurm/ds_zero2_cpu.json",
            "RUN_DIR": str(run_dir), "TRAIN_ARGS": " ".join(args)}


def _records(run_dir: Path) -> tuple[dict[int, dict], dict | None]:
    """(last training record per step, last validation record) of metrics.jsonl.  A step redone after
    a resume from an older checkpoint appears twice; the later record is the one the run kept."""
    train, val = {}, None
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("split") == "val":
                val = rec
            elif "loss" in rec:
                train[rec["step"]] = rec
    return train, val


def _wait_for(predicate, job: Job, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if job.state() not in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED", ""):
            pytest.fail(f"job {job.job_id} ended ({job.state()}) before {what}\n{job.logs()}")
        time.sleep(0.1)
    job.cancel()
    pytest.fail(f"job {job.job_id}: no {what} after {timeout:.0f}s\n{job.logs()}")


def _assert_same_run(run_dir: Path, reference: Path, logs: str) -> None:
    train, val = _records(run_dir)
    ref_train, ref_val = _records(reference)
    assert sorted(train) == list(range(1, MAX_STEPS + 1)), f"steps logged: {sorted(train)}\n{logs}"
    for step in range(1, MAX_STEPS + 1):
        for key in LOSS_KEYS:
            # Exact: same ranks, same data order, dropout seeded by (seed, step, rank), deterministic
            # gloo reductions on CPU; any difference means the resume lost or changed state.
            assert train[step][key] == ref_train[step][key], \
                f"step {step} {key}: {train[step][key]} vs uninterrupted {ref_train[step][key]}"
    assert val is not None, f"no validation metrics in {run_dir}/metrics.jsonl\n{logs}"
    for key in VAL_KEYS:
        assert val[key] == ref_val[key], f"val {key}: {val[key]} vs uninterrupted {ref_val[key]}"


def _task_pids(job_id: str, rank: int) -> list[int]:
    """PIDs of the trainer process of `rank` in `job_id` (not its DataLoader workers: their parent
    carries the same job and rank, so keep the processes whose parent does not)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
            cmd = (proc / "cmdline").read_text().replace("\0", " ")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if env.get("SLURM_JOB_ID") == job_id and env.get("RANK") == str(rank) and "eqv2/train.py" in cmd:
            found[int(proc.name)] = ppid
    return [pid for pid, ppid in found.items() if ppid not in found]


@pytest.fixture(scope="module")
def reference(slurm_cluster, demo_raw, tmp_path_factory) -> tuple[Job, Path]:
    """The uninterrupted run every other run is compared with."""
    submit_dir = tmp_path_factory.mktemp("reference")
    run_dir = submit_dir / "run"
    job = submit("slurm/train_all_md.sh", submit_dir, SBATCH, _env(demo_raw, run_dir))
    state = job.wait(timeout=180)
    assert state in ("COMPLETED", "GONE"), f"reference job {state}\n{job.logs()}"
    return job, run_dir


def test_two_node_run_completes_with_validation(reference):
    job, run_dir = reference
    logs = job.logs()
    assert "2 ranks (2 nodes x 1) on eqv2-n[1-2], rendezvous eqv2-n1:" in logs, logs
    assert "torch-env launch, 2 rank(s) on cpu/gloo" in logs and "ZeRO-2" in logs, logs
    assert "step finished" in logs, logs
    train, val = _records(run_dir)
    assert max(train) == MAX_STEPS, logs
    assert val is not None and val["num_structures"] > 0, f"no validation metrics\n{logs}"
    stamp = run_dir / "jobs" / f"{job.job_id}.0"
    for name in ("job.txt", "env.txt", "run_config.yaml", "ds_config.json", "trained_config.yaml"):
        assert (stamp / name).is_file(), f"{stamp}/{name} missing"
    assert f"run_dir: {run_dir}" in (stamp / "run_config.yaml").read_text()
    assert f"max_steps: {MAX_STEPS}" in (stamp / "run_config.yaml").read_text()
    # torch.compile's caches live beside the run directory, where a requeued job on other nodes and other
    # runs under the same parent find them
    assert f"TORCHINDUCTOR_CACHE_DIR={run_dir.parent}/compile_cache\n" in (stamp / "env.txt").read_text()


def test_preempted_job_checkpoints_requeues_and_matches(reference, demo_raw, tmp_path, jobs):
    run_dir = tmp_path / "run"
    job = submit("slurm/train_all_md.sh", tmp_path, SBATCH, _env(demo_raw, run_dir))
    jobs.append(job)
    _wait_for(lambda: max(_records(run_dir)[0], default=0) >= 5, job, "training step 5", timeout=120)
    # What `#SBATCH --signal=B:USR1@180` delivers before the time limit: USR1 to the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.job_id], check=True, timeout=15)
    state = job.wait(timeout=180)
    logs = job.logs()
    assert state in ("COMPLETED", "GONE"), f"preempted job ended {state}\n{logs}"
    assert "got SIGUSR1" in logs and "requeueing (restart 1)" in logs, logs
    assert "exiting with 75" in logs, logs
    assert "resumed from" in logs, logs
    assert (run_dir / "jobs" / f"{job.job_id}.1").is_dir(), "the requeued run did not stamp restart 1"
    stopped = int(logs.split("checkpoint step_", 1)[1][:8])
    assert 5 <= stopped < MAX_STEPS, f"stopped at step {stopped}: the signal came too late to test a resume"
    _assert_same_run(run_dir, reference[1], logs)


def test_killed_rank_fails_job_and_resubmission_resumes(reference, demo_raw, tmp_path, jobs):
    run_dir = tmp_path / "run"
    env = _env(demo_raw, run_dir)
    job = submit("slurm/train_all_md.sh", tmp_path, SBATCH, env)
    jobs.append(job)
    latest = run_dir / "checkpoints" / "latest"
    _wait_for(lambda: latest.is_file() and max(_records(run_dir)[0], default=0) >= CKPT_EVERY + 2, job,
              "a checkpoint and two more steps", timeout=120)
    pids = _task_pids(job.job_id, rank=1)
    assert len(pids) == 1, f"expected one rank-1 trainer process, found {pids}"
    task_env = (Path("/proc") / str(pids[0]) / "environ").read_text().split("\0")
    assert f"TORCHINDUCTOR_CACHE_DIR={run_dir.parent}/compile_cache" in task_env  # the ranks share the cache
    os.kill(pids[0], signal.SIGKILL)
    t0 = time.monotonic()
    state = job.wait(timeout=60)
    logs = job.logs()
    assert state in ("FAILED", "GONE"), f"job with a killed rank ended {state}\n{logs}"
    assert "step failed with exit" in logs, logs
    assert time.monotonic() - t0 < 45, "the job took too long to fail after a rank died"
    tag = latest.read_text().strip()
    assert tag.startswith("step_"), tag
    resumed_from = int(tag.split("_")[1])
    assert resumed_from < MAX_STEPS, f"the run had finished ({tag}) before the kill"
    data_state = json.loads((run_dir / "checkpoints" / tag / "trainer_state.json").read_text())["data"]
    assert data_state["step"] > 0, f"{tag} is at an epoch boundary; the test needs a mid-epoch resume"

    again = submit("slurm/train_all_md.sh", tmp_path, SBATCH, env)
    jobs.append(again)
    state = again.wait(timeout=180)
    logs = again.logs()
    assert state in ("COMPLETED", "GONE"), f"resubmitted job {state}\n{logs}"
    assert f"resumed from {run_dir}/checkpoints/{tag}" in logs, logs
    _assert_same_run(run_dir, reference[1], logs)


def test_signal_during_startup_requeues_and_matches(reference, demo_raw, tmp_path, jobs):
    """USR1 as soon as the job runs: it lands while the configs are checked or the ranks start, before
    any checkpoint exists; the job must still requeue (not die of bash's default SIGUSR1 action) and
    the rerun must train the whole run from scratch, identical to the uninterrupted one."""
    run_dir = tmp_path / "run"
    job = submit("slurm/train_all_md.sh", tmp_path, SBATCH, _env(demo_raw, run_dir))
    jobs.append(job)
    # RUNNING comes before slurmstepd has started the batch shell; no script can handle a signal that
    # arrives before its first line, so wait for that line (its traps are set just before it)
    _wait_for(lambda: "batch shell started" in job.logs(), job, "the batch shell's first line", timeout=60)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.job_id], check=True, timeout=15)
    state = job.wait(timeout=180)
    logs = job.logs()
    assert state in ("COMPLETED", "GONE"), f"job signalled at start-up ended {state}\n{logs}"
    assert "got SIGUSR1" in logs and "requeueing (restart 1)" in logs, logs
    assert (run_dir / "jobs" / f"{job.job_id}.1").is_dir(), "the requeued run did not stamp restart 1"
    _assert_same_run(run_dir, reference[1], logs)


def test_bad_config_fails_fast_without_launching(slurm_cluster, tmp_path, jobs):
    """The shipped All+MD config without its data: the pre-launch check names the missing manifest,
    exits 2 (never requeued) and no rank is started.  A compile-cache directory the user set is kept."""
    cache = tmp_path / "my_cache"
    job = submit("slurm/train_all_md.sh", tmp_path, SBATCH,
                 {"RUN_DIR": str(tmp_path / "run"), "TORCHINDUCTOR_CACHE_DIR": str(cache)})
    jobs.append(job)
    state = job.wait(timeout=60)
    logs = job.logs()
    assert state in ("FAILED", "GONE"), f"job with a missing data manifest ended {state}\n{logs}"
    assert "data.train_manifest: file not found" in logs and "nothing was launched" in logs, logs
    assert "eqv2.train:" not in logs and "requeueing" not in logs, logs
    env_txt, = (tmp_path / "run" / "jobs").glob("*/env.txt")
    assert f"TORCHINDUCTOR_CACHE_DIR={cache}\n" in env_txt.read_text() and cache.is_dir()
