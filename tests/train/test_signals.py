"""The stop flag's launcher watch (eqv2/training/signals.py), on a real process standing in for the launcher.

The multi-rank behaviour is in test_launcher_signals.py; this is the race that made it flaky: when
another rank saw the launcher's exit first and the ranks agreed to stop, rank 0's own watch thread had
not looked yet, and its stop record said "signal on another rank".  Rank 0 now looks once itself.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from eqv2.training.signals import STOP_RECORD, StopFlag, _stat

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the launcher watch needs /proc")


def _launcher() -> tuple[subprocess.Popen, tuple[int, int, str]]:
    proc = subprocess.Popen(["sleep", "60"])
    return proc, (proc.pid, _stat(proc.pid)[2], "deepspeed")


def test_the_stop_record_names_a_launcher_exit_that_the_watch_thread_had_not_seen(tmp_path, capfd):
    proc, watched = _launcher()
    flag = StopFlag()
    flag.install(launchers=[watched])
    flag._watch_done.set()  # the watch thread stops before its next look: as if it had not looked yet
    try:
        proc.kill()
        proc.wait()
        assert not flag.requested
        flag.write_record(tmp_path, 7, "step_00000007", is_main=True)
    finally:
        flag.restore()
    record = json.loads((tmp_path / STOP_RECORD).read_text())
    assert record["reason"] == f"launcher (pid {proc.pid}, deepspeed) exited", record
    assert flag.signum == signal.SIGTERM
    assert "deepspeed) exited: stopping as for SIGTERM" in capfd.readouterr().err


def test_a_live_launcher_leaves_the_record_to_the_other_rank(tmp_path):
    proc, watched = _launcher()
    flag = StopFlag().install(launchers=[watched])
    try:
        assert not flag.look_at_launcher()
        flag.write_record(tmp_path, 3, "step_00000003", is_main=True)
    finally:
        flag.restore()
        proc.kill()
        proc.wait()
    assert json.loads((tmp_path / STOP_RECORD).read_text())["reason"] == "signal on another rank"


def test_the_watch_thread_sees_the_launcher_exit(tmp_path):
    proc, watched = _launcher()
    flag = StopFlag().install(launchers=[watched])
    try:
        proc.kill()
        proc.wait()
        subprocess.run(["sleep", "1.5"])  # three watch intervals
        assert flag.requested and flag.reason.endswith("deepspeed) exited")
    finally:
        flag.restore()
