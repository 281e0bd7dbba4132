"""Graceful stop on SIGUSR1 / SIGTERM, or on the death of the launcher, for preemption and time limits.

SLURM sends SIGUSR1 shortly before the time limit (``--signal=B:USR1@180``, forwarded by the batch
script) and SIGTERM on preemption/cancel.  The handler only sets a flag: checkpointing inside a signal
handler could interrupt a collective or a half-written tensor.  The loop polls the flag at step
boundaries, agrees on it across ranks (a rank may get the signal slightly later than another), saves a
checkpoint and exits with EXIT_REQUEUE so that the batch script knows to requeue the job.

A signal sent to the launcher instead of the trainer must stop the run the same way, but the launchers
do not all pass it on: the `deepspeed` command dies of SIGTERM/SIGUSR1 and leaves its ranks running
(their parent, DeepSpeed's per-node `launch` process, does not notice), and torchrun dies of SIGUSR1.
So the flag also watches the launcher processes above the trainer (the deepspeed runner and per-node
launcher, torchrun) and is set, as by SIGTERM, as soon as one of them has exited.  Processes are named
by pid and start time (/proc/<pid>/stat), so that a pid reused by a new process is not mistaken for
the launcher; on systems without /proc nothing is watched.

Once the stop checkpoint is complete, rank 0 writes ``<run_dir>/stopped.json`` (step, checkpoint tag,
reason): the batch script reads it to requeue even when the launcher's own exit code is not 75
(torchrun returns 1 when its workers exit 75; a signalled deepspeed runner returns 128 + signal).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

EXIT_OK = 0  # training finished (max steps reached)
EXIT_ERROR = 1  # a failure: the message says what (e.g. too many non-finite losses); do not requeue
EXIT_CONFIG = 2  # bad command line / config / data path: fix the input, do not requeue
EXIT_REQUEUE = 75  # stopped on a signal after saving a checkpoint: requeue and `--resume auto` (EX_TEMPFAIL)

STOP_RECORD = "stopped.json"  # in the run directory: written once the stop checkpoint is complete
WATCH_INTERVAL_S = 0.5  # how often the launcher processes are looked at (two small /proc reads each)


class StopFlag:
    """Set by SIGUSR1/SIGTERM or by the launcher's exit; `signum` remembers which signal came first
    (SIGTERM for a launcher's exit) and `reason` says why, for the log and the stop record."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.reason: str | None = None
        self._previous: dict[int, object] = {}
        self._watch_done = threading.Event()
        self._lock = threading.Lock()
        self._watched: list[tuple[int, int, str]] = []
        self._parent = os.getppid()

    def install(self, signals=(signal.SIGUSR1, signal.SIGTERM), watch_launcher: bool = True,
                launchers: list[tuple[int, int, str]] | None = None) -> "StopFlag":
        """Handle `signals`; with `watch_launcher`, also watch `launchers` ((pid, start, name); by default
        this process's launcher ancestors) and stop as for SIGTERM when one exits."""
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._watched = (launcher_processes() if launchers is None else launchers) if watch_launcher else []
        if self._watched:
            threading.Thread(target=self._watch, name="eqv2-launcher-watch", daemon=True).start()
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            self.reason = signal.Signals(signum).name

    def _watch(self) -> None:
        while not self._watch_done.wait(WATCH_INTERVAL_S):
            if self.look_at_launcher():
                return

    def look_at_launcher(self) -> bool:
        """One look at the watched launcher processes (the watch thread's, or a rank's own when the
        ranks agreed to stop before its watch saw the exit another rank saw): True if one exited."""
        for pid, start, name in self._watched:
            if not process_alive(pid, start) or (pid == self._parent and os.getppid() != self._parent):
                with self._lock:
                    if self.signum is None:  # else a signal came first (`timeout` signals the ranks too)
                        self.signum = signal.SIGTERM
                        self.reason = f"launcher (pid {pid}, {name}) exited"
                        if os.environ.get("LOCAL_RANK", "0") == "0":  # one line per node
                            print(f"eqv2.train (rank {os.environ.get('RANK', '0')}): {self.reason}: stopping as "
                                  f"for SIGTERM", file=sys.stderr, flush=True)
                return True
        return False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def write_record(self, run_dir: Path, step: int, tag: str, is_main: bool) -> None:
        """After the stop checkpoint `tag` of `step` is complete: rank 0 writes the stop record (by
        rename: a reader sees all of it or nothing)."""
        if not is_main:
            return
        if self.signum is None:  # the stop was another rank's: the launcher's exit may be why
            self.look_at_launcher()
        path = Path(run_dir) / STOP_RECORD
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        record = {"step": step, "tag": tag, "reason": self.reason or "signal on another rank",
                  "exit_code": EXIT_REQUEUE}
        with open(tmp, "w") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def restore(self) -> None:
        self._watch_done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks since boot) of `pid`, or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read().decode(errors="replace")
        fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
        return fields[0], int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):  # gone, or not the Linux layout
        return None


def process_alive(pid: int, start: int) -> bool:
    """Whether `pid` is still the process that started at `start` (ticks since boot) and has not exited."""
    st = _stat(pid)
    return st is not None and st[2] == start and st[0] not in ("Z", "X")  # a zombie has exited


def _launcher_name(pid: int) -> str | None:
    """'deepspeed' (the runner), 'deepspeed launch' (its per-node launcher) or 'torchrun', judged from
    the command line; None for any other process."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    head, names = argv[:4], [os.path.basename(a) for a in argv[:2]]  # [python, -u, -m, module]
    if "deepspeed.launcher.launch" in head:
        return "deepspeed launch"
    if "deepspeed" in names or "deepspeed.launcher.runner" in head:
        return "deepspeed"
    if "torchrun" in names or "torch.distributed.run" in head or "torch.distributed.launch" in head:
        return "torchrun"
    return None


def launcher_processes(max_depth: int = 6) -> list[tuple[int, int, str]]:
    """(pid, start time, name) of the launcher processes among this process's ancestors, nearest
    first; empty without /proc (not Linux) or without a launcher (a plain `python`, srun, mpirun)."""
    found, pid = [], os.getppid()
    for _ in range(max_depth):
        if pid <= 1 or (st := _stat(pid)) is None:
            break
        name = _launcher_name(pid)
        if name is not None:
            found.append((pid, st[2], name))
        pid = st[1]
    return found
