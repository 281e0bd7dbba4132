"""eqv2/train.py end to end: real DeepSpeed, real processes, the real demo data and model.

- the demo configuration learns: validation force MAE far below the zero-force baseline;
- SIGUSR1 -> checkpoint at the next step boundary, exit code 75; `--resume auto` then reproduces the
  uninterrupted run's per-step losses exactly (2 ranks, ZeRO-2, grad accumulation, dropout on);
- a 2-rank ZeRO-2 checkpoint resumes on 1 rank (universal checkpoint) with identical fp32 weights,
  Adam moments and EMA;
- ZeRO-3: EMA evaluation matches the exported EMA model, and a 2-rank checkpoint resumes on 1 rank;
- mpirun (mpi4py discovery) reproduces the environment-variable launch.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import eqv2
from tests.train.conftest import HERE, REPO, data_args, demo_val_metrics
from tests.train.conftest import DEMO_STEPS, MAX_STEPS, last_step, records, run_train, start_ranks, wait_ranks
from tests.train.conftest import common_args as _common
from tests.verbs import run_eqv2


def test_demo_trains_below_zero_force_baseline(demo_run, demo_data):
    run_dir = demo_run
    train, evals = records(run_dir)
    final = evals[-1]
    assert final["step"] == DEMO_STEPS and final["num_structures"] == 80  # the whole validation split
    assert final["forces_mae"] < 0.75 * final["forces_mae_zero_baseline"], final
    assert train[DEMO_STEPS]["loss"] < 0.8 * train[25]["loss"]
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    stats = json.loads((demo_data / "train" / "stats.json").read_text())
    assert resolved["model"]["avg_num_nodes"] == pytest.approx(stats["avg_num_nodes"])
    assert resolved["normalizers"]["forces_std"] == pytest.approx(stats["forces_std"])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{DEMO_STEPS:08d}"
    assert (run_dir / "checkpoints" / f"step_{DEMO_STEPS:08d}" / "COMPLETE").is_file()


def test_sigusr1_checkpoints_and_resume_auto_reproduces_losses(demo_data, reference_run, tmp_path):
    run_dir = tmp_path / "interrupted"
    procs = start_ranks(2, _common(demo_data, run_dir) + ["--resume", "auto"])  # auto: nothing yet -> fresh
    deadline = time.time() + 240
    while last_step(run_dir) < 6 and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGUSR1)  # one rank only: the ranks must agree on the stop step
    rc, out = wait_ranks(procs)
    assert rc == [75, 75], out
    stopped = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 6 <= stopped < MAX_STEPS, f"stopped at {stopped}: the signal came too late to test a resume"
    assert f"checkpoint step_{stopped:08d} saved, exiting with 75" in out

    rc, out = run_train(_common(demo_data, run_dir) + ["--resume", "auto"], nproc=2)
    assert rc == [0, 0], out
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:08d}" in out
    ref, _ = records(reference_run)
    got, _ = records(run_dir)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    for step in range(1, MAX_STEPS + 1):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-6, abs=1e-9), step


def _universal(tag_dir: Path, out: Path) -> Path:
    if not out.is_dir():
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(tag_dir), "--output_folder", str(out)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_resume_two_ranks_onto_one(demo_data, reference_run, tmp_path):
    src = reference_run / "checkpoints"
    run_dir = tmp_path / "one_rank"
    # same step count: the resumed run evaluates and saves at once, so its state must equal the source's
    rc, out = run_train(_common(demo_data, run_dir) + ["--resume", str(src)], nproc=1)
    assert rc == [0], out
    tag = f"step_{MAX_STEPS:08d}"
    assert "universal" in out and f"resumed from {src / tag}" in out
    a = _universal(src / tag, tmp_path / "a_universal") / "zero"
    b = _universal(run_dir / "checkpoints" / tag, tmp_path / "b_universal") / "zero"
    names = sorted(p.name for p in a.iterdir() if p.is_dir())  # one directory per parameter
    assert names and names == sorted(p.name for p in b.iterdir() if p.is_dir())
    for name in names:
        for kind in ("fp32", "exp_avg", "exp_avg_sq"):
            ta = torch.load(a / name / f"{kind}.pt", weights_only=False)
            tb = torch.load(b / name / f"{kind}.pt", weights_only=False)
            ta, tb = (t["param"] if isinstance(t, dict) else t for t in (ta, tb))
            assert torch.equal(ta, tb), (name, kind)
    ema_a = torch.load(src / tag / "ema.pt")
    ema_b = torch.load(run_dir / "checkpoints" / tag / "ema.pt")
    assert ema_a["updates"] == ema_b["updates"] == MAX_STEPS
    for name, value in ema_a["shadow"].items():
        assert torch.equal(value, ema_b["shadow"][name]), name
    state = json.loads((run_dir / "checkpoints" / tag / "trainer_state.json").read_text())
    assert state["step"] == MAX_STEPS and state["world_size"] == 1

    # and it trains on from there on one rank
    more = tmp_path / "one_rank_more"
    rc, out = run_train(_common(demo_data, more) + ["--resume", str(src), "--set", f"optim.max_steps={MAX_STEPS + 3}"])
    assert rc == [0], out
    got, _ = records(more)
    assert sorted(got) == [MAX_STEPS + 1, MAX_STEPS + 2, MAX_STEPS + 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in got.values())


def test_zero3_ema_evaluation_export_and_resume_on_one_rank(demo_data, tmp_path):
    """ZeRO-3 on 2 ranks: evaluation with EMA weights (partitioned and persistent parameters) agrees
    with the exported EMA model, and the checkpoint resumes on 1 rank (universal) to the same metrics."""
    def args(run_dir, extra=()):
        return ["--ds_config", str(HERE / "ds_zero3_cpu.json"), "--config", str(HERE / "tiny_run.yaml"),
                *data_args(demo_data), "--set", f"run_dir={run_dir}", "--set", "optim.max_steps=6",
                "--set", "eval.max_batches=0", *extra]

    two = tmp_path / "z3"
    rc, out = run_train(args(two), nproc=2)
    assert rc == [0, 0], out
    final = records(two)[1][-1]
    # each rank wrote its own part of the average (no rank held all of it), about half each
    tag_dir = two / "checkpoints" / "step_00000006"
    assert not (tag_dir / "ema.pt").exists()
    shards = [torch.load(tag_dir / f"ema_shard_{r:05d}.pt", weights_only=True) for r in range(2)]
    sizes = [sum(t.numel() for t in shard["shadow"].values()) for shard in shards]
    total = sum(shards[0]["numel"].values())
    assert sizes[0] == sizes[1] and total <= sum(sizes) < total + 2 * len(shards[0]["numel"]), (sizes, total)
    model_file = tmp_path / "z3.pt"
    run_eqv2("export", two / "checkpoints", "-o", model_file, check=True)
    model = eqv2.load_model(model_file)
    got = demo_val_metrics(model, demo_data, batch_size=2)
    for key in ("forces_mae", "energy_mae", "forces_cos"):
        assert got[key] == pytest.approx(final[key], rel=1e-4), key

    one = tmp_path / "z3_one"
    rc, out = run_train(args(one, ["--resume", str(two / "checkpoints")]), nproc=1)
    assert rc == [0], out
    assert "universal" in out
    resumed = records(one)[1][-1]
    for key in ("forces_mae", "energy_mae", "forces_cos"):
        assert resumed[key] == pytest.approx(final[key], rel=1e-5), key

    # on the same rank count each rank loads its own EMA shard
    again = tmp_path / "z3_again"
    rc, out = run_train(args(again, ["--resume", str(two / "checkpoints")]), nproc=2)
    assert rc == [0, 0], out
    assert "universal" not in out
    resumed = records(again)[1][-1]
    for key in ("forces_mae", "energy_mae", "forces_cos"):
        assert resumed[key] == pytest.approx(final[key], rel=1e-6), key


def test_mpirun_launch_matches_torch_env_launch(demo_data, reference_run, tmp_path):
    """Under mpirun the ranks come from mpi4py; the run must equal the RANK/WORLD_SIZE-launched one."""
    import shutil

    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("no mpirun (install the mpich wheel: the test extras)")
    run_dir = tmp_path / "mpi"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([mpirun, "-n", "2", sys.executable, str(REPO / "eqv2" / "train.py"),
                           *_common(demo_data, run_dir)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "eqv2.train: mpi launch, 2 rank(s)" in proc.stdout
    ref, _ = records(reference_run)
    got, _ = records(run_dir)
    assert [got[s]["loss"] for s in sorted(got)] == pytest.approx([ref[s]["loss"] for s in sorted(ref)], rel=1e-6)
