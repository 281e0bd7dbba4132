"""A stop signal sent to the launcher, not the trainer (docs/training.md, "Signals to the launcher").

Real launchers, 2 CPU ranks each: the `deepspeed` command (SIGTERM, SIGUSR1), `timeout ... deepspeed`
reaching its time limit, and torchrun (SIGUSR1, SIGTERM).  Whatever the launcher does with the signal,
every rank must take the stop path (checkpoint at the next step, exit 75), no trainer process may be
left running, rank 0 must write the stop record `stopped.json`, and `--resume auto` must continue the
run exactly.  Before the launcher watch, the `deepspeed` runner and torchrun died of the signal and
left both ranks training on with no parent.

The test process is made a child subreaper while a launch runs, so that processes orphaned by a dying
launcher are reparented to it: their exit codes can then be read, and none can escape the check.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from eqv2.training.signals import EXIT_REQUEUE, STOP_RECORD, launcher_processes, process_alive
from tests.train.conftest import MAX_STEPS, REPO, TRAIN, common_args, free_port, last_step, launcher_env, records

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the launcher watch needs /proc")

PR_SET_CHILD_SUBREAPER = 36
START_TIMEOUT_S = 300  # until the first steps are logged: a loaded 2-core machine starts 2 ranks slowly
STOP_TIMEOUT_S = 180  # from the signal until every process of the launch is gone


def _subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _command(launcher: str, args: list[str]) -> list[str]:
    port = str(free_port())
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", "2", "--master_port", port, str(TRAIN), *args]
    if launcher == "timeout":  # a time limit far away: its expiry is brought forward with SIGALRM
        return ["timeout", "3600", *_command("deepspeed", args)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
            str(TRAIN), *args]


def _is_rank(proc: psutil.Process) -> bool:
    try:
        argv = proc.cmdline()
    except psutil.Error:
        return False
    return any(a.endswith(os.path.join("eqv2", "train.py")) for a in argv[:3]) and "--nproc_per_node" not in argv


class Launch:
    """One launch in its own session, its output in a file; `processes` are every descendant seen."""

    def __init__(self, launcher: str, args: list[str], log: Path):
        self.log = log
        self.processes: dict[int, psutil.Process] = {}
        self.codes: dict[int, int] = {}  # exit codes of the orphans this process reaped
        self.cmdlines: dict[int, list[str]] = {}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(_command(launcher, args), cwd=REPO, env=launcher_env(), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ranks(self) -> list[psutil.Process]:
        return [p for p in self.processes.values() if _is_rank(p)]

    def look(self) -> None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.processes.setdefault(child.pid, child)
        for pid, proc in self.processes.items():  # again each time: one seen between fork and exec changes
            with contextlib.suppress(psutil.Error):
                # is_running: not a reused pid; an exiting process shows an empty command line
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE and (argv := proc.cmdline()):
                    self.cmdlines[pid] = argv

    def wait_for_step(self, run_dir: Path, step: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while last_step(run_dir) < step or len(self.ranks()) < 2:
            assert self.proc.poll() is None, f"launch ended early ({self.proc.returncode})\n{self.output()[-4000:]}"
            assert time.monotonic() < deadline, f"no step {step} after {START_TIMEOUT_S}s\n{self.output()[-4000:]}"
            self.look()
            time.sleep(0.05)
        self.look()

    def _gone(self, proc: psutil.Process) -> bool:
        with contextlib.suppress(ChildProcessError):  # not a child of this process
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                self.codes[pid] = os.waitstatus_to_exitcode(status)
                return True
        try:
            return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    def wait_all_gone(self) -> list[psutil.Process]:
        """Wait until the launcher and every process seen below it have exited; returns those left."""
        deadline = time.monotonic() + STOP_TIMEOUT_S
        left = list(self.processes.values())
        while time.monotonic() < deadline:
            self.look()
            left = [p for p in self.processes.values() if not self._gone(p)]
            if not left and self.proc.poll() is not None:
                return []
            time.sleep(0.1)
        return left

    def kill(self) -> None:
        """Whatever is still running of the launch (a failed test must not leave ranks behind)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in self.processes.values():  # torchrun starts each worker in a session of its own
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.proc.wait(timeout=60)
        for p in self.processes.values():
            self._gone(p)


def _stop_under(launcher: str, sig: signal.Signals, demo_data: Path, run_dir: Path, tmp_path: Path,
                to_rank: bool = False, max_steps: int = 400) -> tuple[Launch, int]:
    """Launch the tiny 2-rank run, send `sig` to the launcher's own process (`to_rank`: to rank 1)
    after step 3, and wait until every process of the launch is gone.  Returns the launch and the
    stop step.  `max_steps`: far beyond the stop, unless the run is to be compared with the reference."""
    _subreaper(True)
    launch = Launch(launcher, [*common_args(demo_data, run_dir), "--set", f"optim.max_steps={max_steps}",
                               "--resume", "auto"],
                    tmp_path / f"{launcher}_{sig.name}.log")
    try:
        launch.wait_for_step(run_dir, 3)
        ranks = launch.ranks()
        assert len(ranks) == 2, [p.cmdline() for p in launch.processes.values()]
        if to_rank:
            next(r for r in ranks if "--local_rank=1" in r.cmdline() or r.environ().get("RANK") == "1").send_signal(sig)
        else:
            launch.proc.send_signal(sig)
        left = launch.wait_all_gone()
        assert not left, f"still running after {STOP_TIMEOUT_S}s: {[(p.pid, p.cmdline()[:4]) for p in left]}\n" \
                         f"{launch.output()[-4000:]}"
    finally:
        launch.kill()
        _subreaper(False)
    out = launch.output()
    ckpt_dir = run_dir / "checkpoints"
    stopped = int((ckpt_dir / "latest").read_text().strip().split("_")[1])
    assert 3 <= stopped < max_steps, f"stopped at {stopped}\n{out[-4000:]}"
    assert (ckpt_dir / f"step_{stopped:08d}" / "COMPLETE").is_file()
    assert f"checkpoint step_{stopped:08d} saved, exiting with {EXIT_REQUEUE}" in out, out[-4000:]
    record = json.loads((run_dir / STOP_RECORD).read_text())
    assert record["step"] == stopped and record["tag"] == f"step_{stopped:08d}", record
    assert last_step(run_dir) == stopped  # no rank trained on past the stop checkpoint
    for rank in ranks:  # a rank that this process reaped (its launcher had died first) exited 75
        assert launch.codes.get(rank.pid, EXIT_REQUEUE) == EXIT_REQUEUE, (launch.codes, out[-4000:])
    return launch, stopped


def _node_launcher_code(launch: Launch) -> int | None:
    """Exit code of DeepSpeed's per-node launcher, if this process reaped it (its runner died first)."""
    pids = [p.pid for p in launch.processes.values() if "deepspeed.launcher.launch" in launch.cmdlines.get(p.pid, [])]
    assert len(pids) == 1, launch.cmdlines
    return launch.codes.get(pids[0])


def test_sigterm_to_deepspeed_stops_every_rank_and_resume_is_exact(demo_data, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    launch, stopped = _stop_under("deepspeed", signal.SIGTERM, demo_data, run_dir, tmp_path, max_steps=MAX_STEPS)
    out = launch.output()
    assert launch.proc.returncode == -signal.SIGTERM  # the runner dies of it: 143 in a shell
    # the ranks' parent (DeepSpeed's per-node launcher) outlived the runner and passed their 75 on
    assert _node_launcher_code(launch) == EXIT_REQUEUE, launch.codes
    assert "deepspeed) exited: stopping as for SIGTERM" in out, out[-4000:]
    assert json.loads((run_dir / STOP_RECORD).read_text())["reason"].endswith("deepspeed) exited")

    proc = subprocess.run(_command("deepspeed", [*common_args(demo_data, run_dir), "--resume", "auto"]), cwd=REPO,
                          env=launcher_env(), capture_output=True, text=True, timeout=START_TIMEOUT_S + 300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:08d}" in proc.stdout
    ref, _ = records(reference_run)
    got, _ = records(run_dir)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    for step in range(1, MAX_STEPS + 1):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-6, abs=1e-9), step


def test_sigusr1_to_deepspeed_stops_every_rank(demo_data, tmp_path):
    launch, _ = _stop_under("deepspeed", signal.SIGUSR1, demo_data, tmp_path / "run", tmp_path)
    assert launch.proc.returncode == -signal.SIGUSR1  # 138 in a shell
    assert _node_launcher_code(launch) == EXIT_REQUEUE, launch.codes


def test_timeout_expiring_over_deepspeed_stops_every_rank(demo_data, tmp_path):
    # SIGALRM is how `timeout` learns that its time is up: it then sends SIGTERM to the runner and,
    # through the process group, to every rank and to DeepSpeed's per-node launcher (which SIGTERMs
    # the ranks again and kills them 30 s later)
    launch, _ = _stop_under("timeout", signal.SIGALRM, demo_data, tmp_path / "run", tmp_path)
    assert launch.proc.returncode == 124
    assert _node_launcher_code(launch) == 1, launch.codes  # it was signalled itself


@pytest.mark.parametrize("sig, code", [(signal.SIGUSR1, -signal.SIGUSR1), (signal.SIGTERM, 1)],
                         ids=["SIGUSR1", "SIGTERM"])
def test_torchrun_signalled_stops_every_rank(demo_data, tmp_path, sig, code):
    # SIGUSR1 kills torchrun and orphans its workers; SIGTERM it forwards, then exits 1 although both
    # workers exited 75 (the SLURM scripts requeue on the stop record, not on this code)
    launch, _ = _stop_under("torchrun", sig, demo_data, tmp_path / "run", tmp_path)
    assert launch.proc.returncode == code, launch.output()[-4000:]


@pytest.mark.parametrize("launcher, code", [("deepspeed", EXIT_REQUEUE), ("torchrun", 1)])
def test_signal_to_one_rank_under_a_launcher(demo_data, tmp_path, launcher, code):
    """The row above the launcher rows: SIGUSR1 to rank 1 alone; both ranks stop at one step and exit
    75, `deepspeed` passes the 75 on, torchrun turns it into 1."""
    launch, _ = _stop_under(launcher, signal.SIGUSR1, demo_data, tmp_path / "run", tmp_path, to_rank=True)
    assert launch.proc.returncode == code, launch.output()[-4000:]
    assert "exited: stopping as for SIGTERM" not in launch.output()


def _start_time(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rindex(")") + 2:].split()[19])


def test_a_process_is_known_by_pid_and_start_time():
    """A pid alone could name a new process after reuse; an exited child not yet reaped (a zombie,
    as a killed launcher is until its parent waits) has exited."""
    me = os.getpid()
    assert process_alive(me, _start_time(me)) and not process_alive(me, _start_time(me) + 1)
    child = subprocess.Popen(["sleep", "30"])
    try:
        start = _start_time(child.pid)
        assert process_alive(child.pid, start)
        child.kill()
        deadline = time.monotonic() + 30
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:  # killed, not reaped
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not process_alive(child.pid, start)
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid, start)  # reaped


def test_no_launcher_above_a_plain_process():
    """pytest's own ancestors are no launcher: a plain `python` trainer watches nothing (its parent may
    exit on purpose, e.g. under nohup)."""
    assert launcher_processes() == []
