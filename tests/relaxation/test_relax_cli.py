"""`eqv2 relax` end to end with EMT forces (--calculator): results and metrics files, trajectories, resume
after a kill -9, the array split, and one-line errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest

from eqv2.relaxation.results import load_results

REPO = Path(__file__).resolve().parents[2]
EMT = "ase.calculators.emt:EMT"


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "eqv2.cli", "relax", *args]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_relax_writes_results_metrics_and_trajectories(set_file, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(_cmd("--calculator", EMT, "--input", str(set_file), "--output", str(out), "--max-atoms", "40",
                              "--trajectories", "--oracle", EMT), capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_structures"] == 8 and metrics["converged"] == 8
    # EMT relaxed by the engine reaches EMT's own relaxed structures: IS2RE error and distances near zero
    assert metrics["is2re"]["energy_mae"] < 1e-6 and metrics["is2re"]["energy_within_threshold"] == 1.0
    assert metrics["is2rs"]["average_distance_within_threshold"] == 1.0
    assert metrics["is2rs"]["forces_below_threshold_0.05"] == 1.0
    rs, re = np.load(out / "is2rs.npz"), np.load(out / "is2re.npz")
    ids = sorted(str(1000 + i) for i in range(8))
    assert list(rs["ids"]) == ids and list(re["ids"]) == ids
    pieces = np.split(rs["pos"], rs["chunk_idx"])
    results = load_results(out)
    for sid, pos in zip(ids, pieces):
        np.testing.assert_array_equal(pos, results[sid].positions)
        frames = ase.io.read(out / "trajectories" / f"{sid}.traj", index=":")
        assert len(frames) == results[sid].steps + 1
        np.testing.assert_allclose(frames[-1].get_positions(), pos, atol=1e-12)
        assert frames[-1].get_potential_energy() == pytest.approx(results[sid].energy)
    assert "wrote" in run.stdout.strip().splitlines()[-1]


def test_resume_after_kill(set_file, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ("--calculator", EMT, "--input", str(set_file), "--max-structures", "1")
    subprocess.run(_cmd(*args, "--output", str(ref)), check=True, capture_output=True, env=_env(), timeout=300)
    proc = subprocess.Popen(_cmd(*args, "--output", str(out)), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = out / "results.0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (part.exists() and part.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = part.read_text().count("\n")
    assert 2 <= done_before < 8, f"kill came too late to test a resume ({done_before} finished)"
    again = subprocess.run(_cmd(*args, "--output", str(out)), capture_output=True, text=True, env=_env(), timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"{done_before} already done" in again.stdout
    got, want = load_results(out), load_results(ref)
    assert sorted(got) == sorted(want)
    for sid in want:
        np.testing.assert_array_equal(got[sid].positions, want[sid].positions)
        assert got[sid].energy == want[sid].energy and got[sid].steps == want[sid].steps


def test_array_tasks_split_and_collect(set_file, tmp_path):
    out = tmp_path / "out"
    for task in (0, 1):
        subprocess.run(_cmd("--calculator", EMT, "--input", str(set_file), "--output", str(out), "--num-tasks", "2",
                            "--task-index", str(task)), check=True, capture_output=True, env=_env(), timeout=300)
    parts = [set(json.loads(line)["sid"] for line in (out / f"results.{t}.jsonl").read_text().splitlines()) for t in (0, 1)]
    assert parts[0] == {"1000", "1002", "1004", "1006"} and parts[1] == {"1001", "1003", "1005", "1007"}
    assert json.loads((out / "metrics.json").read_text())["num_structures"] == 8  # written by the last task
    (out / "metrics.json").unlink()
    run = subprocess.run(_cmd("--collect", str(out)), capture_output=True, text=True, env=_env(), timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads((out / "metrics.json").read_text())["num_structures"] == 8


@pytest.mark.parametrize("args, message", [
    (("--calculator", EMT, "--input", "missing.extxyz", "--output", "o"), "input not found: missing.extxyz"),
    (("--calculator", "nope", "--input", "x", "--output", "o"), "want module:Class"),
    (("--input", "x", "--output", "o"), "give --input, --output and one of --checkpoint"),
    (("--checkpoint", "missing.pt", "--input", "x", "--output", "o"), "model checkpoint not found"),
    (("--collect", "empty"), "no relaxation results"),
])
def test_user_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    run = subprocess.run(_cmd(*args), capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_torchrun_ranks_are_tasks(set_file, tmp_path):
    """Under torchrun every rank relaxes its share (RANK of WORLD_SIZE) and the last one to finish writes the
    metrics: the same results as one process."""
    out, serial = tmp_path / "out", tmp_path / "serial"
    args = ("--calculator", EMT, "--input", str(set_file), "--max-structures", "2")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
                    "-m", "eqv2.relax", *args, "--output", str(out)], check=True, capture_output=True, env=_env(), timeout=300)
    subprocess.run(_cmd(*args, "--output", str(serial)), check=True, capture_output=True, env=_env(), timeout=300)
    assert sorted(p.name for p in out.glob("results.*.jsonl")) == ["results.0.jsonl", "results.1.jsonl"]
    got, want = load_results(out), load_results(serial)
    assert sorted(got) == sorted(want)
    for sid in want:
        np.testing.assert_allclose(got[sid].positions, want[sid].positions, atol=1e-9)
    m_got, m_want = (json.loads((d / "metrics.json").read_text()) for d in (out, serial))
    assert m_got["is2rs"] == pytest.approx(m_want["is2rs"], abs=1e-9) and m_got["num_structures"] == 8
