"""Fixtures for tests against a real SLURM cluster (brought up by .ci/slurm_up.sh).

Every wait is bounded: a job that asks for more than the cluster has pends forever, so a hung
`sbatch --wait` would stall CI.  Jobs are judged by what they wrote (logs, metrics, shards) and by
their final state, never by sbatch's exit code alone.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


def _cluster_problem() -> str | None:
    """Why the SLURM tests cannot run here, or None when a cluster with two idle nodes answers."""
    for tool in ("sbatch", "squeue", "scontrol", "sinfo", "scancel"):
        if shutil.which(tool) is None:
            return f"no SLURM client tools ({tool} not on PATH); start a cluster with .ci/slurm_up.sh"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=15)
    except (subprocess.TimeoutExpired, OSError) as err:
        return f"SLURM controller does not answer ({err}); start it with .ci/slurm_up.sh"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return f"SLURM controller not up ({(ping.stdout + ping.stderr).strip()}); start it with .ci/slurm_up.sh"
    usable = {line.split()[0] for line in nodes.stdout.splitlines() if line.split()[1:2] and
              line.split()[1] in ("idle", "mix", "alloc")}
    if len(usable) < 2:
        return f"need 2 usable SLURM nodes, sinfo shows: {nodes.stdout.strip()!r}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """Skip without a cluster; fail instead under EQV2_REQUIRE_SLURM=1 (CI, after .ci/slurm_up.sh),
    so that a cluster that did not come up cannot pass as skipped tests."""
    problem = _cluster_problem()
    if problem:
        if os.environ.get("EQV2_REQUIRE_SLURM") == "1":
            pytest.fail(f"EQV2_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)


@dataclass
class Job:
    job_id: str
    submit_dir: Path

    def state(self) -> str:
        """JobState from slurmctld, or "" once the record has been purged (MinJobAge after the end).
        An array job has one record per task: while any task is unfinished that task's state is
        returned, then FAILED if any failed, else the common final state."""
        out = subprocess.run(["scontrol", "-o", "show", "job", self.job_id], capture_output=True, text=True,
                             timeout=15).stdout
        states = [field.split("=", 1)[1] for field in out.split() if field.startswith("JobState=")]
        unfinished = [st for st in states if st not in TERMINAL]
        if unfinished:
            return unfinished[0]
        if not states:
            return ""
        return "FAILED" if "FAILED" in states else states[0]

    def restarts(self) -> int:
        out = subprocess.run(["scontrol", "-o", "show", "job", self.job_id], capture_output=True, text=True,
                             timeout=15).stdout
        for field in out.split():
            if field.startswith("Restarts="):
                return int(field.split("=", 1)[1])
        return -1

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(self.submit_dir.glob("*.out")))

    def wait(self, timeout: float, poll: float = 0.5) -> str:
        """Wait for a terminal state; on timeout cancel the job and fail with its logs."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            state = self.state()
            if state in TERMINAL:
                return state
            if state == "" and last:  # purged after finishing between two polls
                return "GONE"
            last = state or last
            time.sleep(poll)
        subprocess.run(["scancel", self.job_id], timeout=15)
        pytest.fail(f"job {self.job_id} still {last or 'unknown'} after {timeout:.0f}s (cancelled)\n{self.logs()}")

    def cancel(self) -> None:
        subprocess.run(["scancel", self.job_id], timeout=15)


def submit(script: str, submit_dir: Path, sbatch_args: list[str], env: dict[str, str],
           script_args: tuple[str, ...] = ()) -> Job:
    """sbatch REPO/script from submit_dir (where the job's log lands) with extra environment."""
    # The job runs in this interpreter's environment, also when pytest was started without activating
    # it (make test): its bin/ (mpirun of the mpich wheel, for one) goes first on PATH.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    full_env = {**os.environ, "PATH": path, "EQV2_ROOT": str(REPO), "PYTHON": sys.executable, **env}
    # torch writes its default compile-cache directory into os.environ the first time a test of this
    # process compiles; a user's shell has no such leftover, so neither does the job (it would
    # override the scripts' cache beside the run directory); nor a user's EQV2_COMPILE_CACHE
    for name in ("TORCHINDUCTOR_CACHE_DIR", "EQV2_COMPILE_CACHE"):
        if name not in env:
            full_env.pop(name, None)
    out = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(REPO / script), *script_args], cwd=submit_dir,
                         env=full_env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"sbatch {script} failed: {out.stderr}"
    return Job(out.stdout.strip().split(";")[0], submit_dir)


@pytest.fixture
def jobs():
    """Submitted jobs; any still queued or running when the test ends is cancelled."""
    submitted: list[Job] = []
    yield submitted
    for job in submitted:
        if job.state() not in TERMINAL | {""}:
            job.cancel()


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory) -> Path:
    """A small dataset in OC20's raw layout plus its shards (`eqv2 demo-data`, ~10 s)."""
    out = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, "-m", "eqv2", "demo-data", "--out", str(out),
                    "--train-systems", "20", "--val-systems", "4", "--frames", "4", "--no-progress"],
                   check=True, cwd=REPO, timeout=180)
    return out
