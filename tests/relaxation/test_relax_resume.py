"""`eqv2 relax` stopped by a real SIGTERM mid-relaxation and started again: the structures in flight continue
from OUT/inflight.0.pt (only their remaining steps are evaluated) and every result and trajectory equals an
uninterrupted run's; a state file of another input set or a damaged one is a one-line error naming it, and
--discard-inflight restarts those structures from their initial positions."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time

import ase.io
import numpy as np
import pytest
import torch

from eqv2.relaxation.inputs import read_inputs
from eqv2.relaxation.results import load_results
from tests.relaxation.emt_set import write_is2r_extxyz
from tests.relaxation.test_relax_cli import EMT, _cmd, _env

ARGS = ("--calculator", EMT, "--max-structures", "2", "--trajectories")


def _same_as(out, ref):
    got, want = load_results(out), load_results(ref)
    assert sorted(got) == sorted(want)
    for sid, w in want.items():
        assert got[sid].steps == w.steps, sid
        np.testing.assert_allclose(got[sid].positions, w.positions, atol=1e-10)
        assert got[sid].energy == pytest.approx(w.energy, abs=1e-10)
        frames = ase.io.read(out / "trajectories" / f"{sid}.traj", index=":")
        ref_frames = ase.io.read(ref / "trajectories" / f"{sid}.traj", index=":")
        assert len(frames) == len(ref_frames) == w.steps + 1, sid
        for a, b in zip(frames, ref_frames):
            np.testing.assert_allclose(a.get_positions(), b.get_positions(), atol=1e-10)
    return got, want


def _sids(part) -> list[str]:
    return [json.loads(line)["sid"] for line in part.read_text().splitlines()]


def _evaluations(stdout: str) -> int:
    return int(re.search(r"(\d+) structure evaluations", stdout).group(1))


@pytest.fixture(scope="module")
def reference(set_file, tmp_path_factory):
    ref = tmp_path_factory.mktemp("ref") / "ref"
    run = subprocess.run(_cmd(*ARGS, "--input", str(set_file), "--output", str(ref)), capture_output=True, text=True,
                         env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr
    return ref


def test_sigterm_then_continue(set_file, reference, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(*ARGS, "--input", str(set_file), "--output", str(out), "--checkpoint-every", "10"),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state, part = out / "inflight.0.pt", out / "results.0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (state.exists() and part.exists() and part.read_text().count("\n") >= 1):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 75, stderr  # stopped after writing the state: requeue
    assert "stopped on SIGTERM" in stdout and f"in-flight state in {state}" in stdout, stdout
    done_before = part.read_text().count("\n")
    assert 1 <= done_before < 8, f"the signal came too late to test a continuation ({done_before} finished)"
    rec = torch.load(state, weights_only=True)
    assert rec["sids"] and min(rec["steps"]) > 0 and not set(rec["sids"]) & set(load_results(out))
    other = tmp_path / "other"
    shutil.copytree(out, other)

    again = subprocess.run(_cmd(*ARGS, "--input", str(set_file), "--output", str(out)), capture_output=True, text=True,
                           env=_env(), timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"{len(rec['sids'])} continued from {state}" in again.stdout, again.stdout
    assert not state.exists()  # nothing in flight once the task is done
    got, want = _same_as(out, reference)
    # only the remaining steps were evaluated: the continued structures did not start again
    finished_now = set(want) - set(_sids(part)[:done_before])
    assert _evaluations(again.stdout) == sum(want[s].steps + 1 for s in finished_now) - sum(rec["steps"])

    # the same state against another input set (the same ids, moved atoms): refused, naming the file
    moved = tmp_path / "moved.extxyz"
    structures = list(read_inputs([str(set_file)]))
    for s in structures:
        s.positions = s.positions + 0.01
    write_is2r_extxyz(moved, structures)
    bad = subprocess.run(_cmd(*ARGS, "--input", str(moved), "--output", str(other)), capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    line, = bad.stderr.strip().splitlines()
    assert line.startswith(f"eqv2 relax: {other / 'inflight.0.pt'}: structure ") and "another input set" in line, line


def test_damaged_state_then_discard(set_file, reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "inflight.0.pt").write_bytes(b"PK\x03\x04 cut short by a full disk")
    bad = subprocess.run(_cmd(*ARGS, "--input", str(set_file), "--output", str(out)), capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    line, = bad.stderr.strip().splitlines()
    assert f"{out / 'inflight.0.pt'}: not a readable in-flight state" in line and "--discard-inflight" in line, line
    fresh = subprocess.run(_cmd(*ARGS, "--input", str(set_file), "--output", str(out), "--discard-inflight"),
                           capture_output=True, text=True, env=_env(), timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    assert "--discard-inflight: removed" in fresh.stdout and "continued" not in fresh.stdout
    _same_as(out, reference)


def test_batch_script_forwards_sigterm(set_file, reference, tmp_path):
    """slurm/relax.sh run as the batch shell (no SLURM needed for this path): SIGTERM to the shell reaches the
    relaxation as SIGUSR1, which saves its in-flight state and exits 75, and the script exits 75 saying so;
    run again, the script finishes the set with the in-flight structures continued."""
    import os
    import sys

    from tests.relaxation.test_relax_cli import REPO

    out = tmp_path / "out"
    env = {**_env(), "CALCULATOR": EMT, "DEVICE": "cpu", "PYTHON": sys.executable, "EQV2_ROOT": str(REPO),
           "RELAX_ARGS": "--max-structures 2 --trajectories --checkpoint-every 10"}
    env.pop("SLURM_JOB_ID", None)
    cmd = ["bash", str(REPO / "slurm" / "relax.sh"), "-", str(set_file), str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True)
    state, part = out / "inflight.0.pt", out / "results.0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (state.exists() and part.exists() and part.read_text().count("\n") >= 1):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # to the batch shell only, as SLURM's scancel/preemption signals it
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 75, stderr
    assert "got SIGTERM: asking the tasks to checkpoint and stop" in stderr and "stopped on SIGUSR1" in stdout, stderr
    assert state.exists() and part.read_text().count("\n") < 8
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert again.returncode == 0 and "continued from" in again.stdout and "array task 0: done" in again.stderr, again.stderr
    _same_as(out, reference)
    assert not os.path.exists(state)
