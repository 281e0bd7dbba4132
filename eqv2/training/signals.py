"""Graceful stop on SIGUSR1 / SIGTERM for SLURM preemption and time limits.

SLURM sends SIGUSR1 shortly before the time limit (``--signal=B:USR1@180``, forwarded by the batch
script) and SIGTERM on preemption/cancel.  The handler only sets a flag: checkpointing inside a signal
handler could interrupt a collective or a half-written tensor.  The loop polls the flag at step
boundaries, agrees on it across ranks (a rank may get the signal slightly later than another), saves a
checkpoint and exits with EXIT_REQUEUE so that the batch script knows to requeue the job.
"""
from __future__ import annotations

import signal

EXIT_OK = 0  # training finished (max steps reached)
EXIT_ERROR = 1  # a failure: the message says what (e.g. too many non-finite losses); do not requeue
EXIT_CONFIG = 2  # bad command line / config / data path: fix the input, do not requeue
EXIT_REQUEUE = 75  # stopped on a signal after saving a checkpoint: requeue and `--resume auto` (EX_TEMPFAIL)


class StopFlag:
    """Set by SIGUSR1/SIGTERM; `signum` remembers which one came first (for the log)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self, signals=(signal.SIGUSR1, signal.SIGTERM)) -> "StopFlag":
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
