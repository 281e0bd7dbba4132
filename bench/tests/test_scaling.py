"""bench/scaling.py: real multi-process trainer runs (CPU ranks here, one GPU per rank on a GPU node)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.train.conftest import HERE  # the trainer tests' tiny run and CPU ds_config

REPO = Path(__file__).resolve().parents[2]


def _scaling(tmp_path: Path, demo_data: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bench.scaling", "--ranks", "1", "2",
           "--ds_config", str(HERE / "ds_zero2_cpu.json"), "--config", str(HERE / "tiny_run.yaml"),
           "--data", str(demo_data), "--micro-batch", "2", "--steps", "8", "--skip", "2", "--log-every", "2",
           "--work", str(tmp_path / "work"), "--out", str(tmp_path / "scaling.json"), "--timeout", "240", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_weak_scaling_runs_one_and_two_ranks(tmp_path, demo_data):
    # shape buckets wide enough that every 2-structure batch of the demo data pads to one shape: each
    # rank meets exactly one new shape, at its first step
    proc = _scaling(tmp_path, demo_data, "--set", "execution.pad_atoms_multiple=512",
                    "--set", "execution.pad_edges_multiple=4096")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "scaling.json").read_text())["weak_scaling"]
    assert [r["ranks"] for r in rows] == [1, 2]
    assert rows[0]["efficiency"] == 1.0 and rows[0]["steady_efficiency"] == 1.0
    assert "| quiet per rank (intervals) | quiet efficiency |" in proc.stdout
    for row in rows:
        assert row["samples_per_s"] > 0 and row["intervals"] == 3  # logged steps 4, 6, 8 are timed
        assert abs(row["samples_per_s_per_rank"] * row["ranks"] - row["samples_per_s"]) < 1e-9
        assert 0.0 <= row["data_wait_frac"] < 1.0  # the loop's share of time blocked on the loader
        assert row["steady_intervals"] == 3 and row["new_shape_buckets"] == 0
        assert abs(row["steady_samples_per_s_per_rank"] - row["samples_per_s_per_rank"]) < 1e-9
        assert row["quiet_intervals"] <= row["steady_intervals"] and row["gc_full"] >= 0  # collections are logged
        # the trainer's record: the new shapes of all ranks, summed, in the interval they were met
        recs = [json.loads(line) for line in (tmp_path / "work" / f"weak_{row['ranks']}" / "metrics.jsonl")
                .read_text().splitlines()]
        assert [r["new_shape_buckets"] for r in recs if "split" not in r] == [row["ranks"], 0, 0, 0], recs
        # the slowest rank's wait is logged beside the mean over ranks
        assert all(r["data_wait_max_frac"] >= r["data_wait_frac"] - 1e-12 for r in recs if "split" not in r), recs
        assert row["data_wait_max_frac"] >= row["data_wait_frac"]
        assert row["startup"]["launch_to_first_step_s"] > row["startup"]["first_step_s"] > 0  # training/startup.py
    # each rank count trained its own run directory, and wrote no checkpoint (not timed, minutes for a large model)
    assert (tmp_path / "work" / "weak_2" / "metrics.jsonl").exists()
    assert not [p for n in (1, 2) for p in (tmp_path / "work" / f"weak_{n}" / "checkpoints").glob("step_*")]
    assert "checkpoint.save_at_end=false: step 8 is not saved" in (tmp_path / "work" / "weak_2" / "log.txt").read_text()
    # a shorter run into the same --work directory times its own steps only (the trainer appends to
    # metrics.jsonl, so step 8 of the run above would otherwise be read as a third interval)
    proc = _scaling(tmp_path, demo_data, "--ranks", "1", "--steps", "6")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    row, = json.loads((tmp_path / "scaling.json").read_text())["weak_scaling"]
    assert row["intervals"] == 2, row  # steps 4 and 6
    recs = [json.loads(line) for line in (tmp_path / "work" / "weak_1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "split" not in r] == [2, 4, 6], recs


def test_steady_state_leaves_out_intervals_with_new_shape_buckets():
    scaling = _module()
    recs = [dict(step=s, samples_per_s=v, atoms_per_s=10 * v, peak_mem_gib=1.0, data_wait_frac=0.0,
                 new_shape_buckets=n) for s, v, n in [(20, 40.0, 0), (40, 10.0, 3), (60, 44.0, 0)]]
    out = scaling.summarise(recs, 2)
    assert out["samples_per_s_per_rank"] == 94.0 / 3 / 2 and out["intervals"] == 3
    assert out["steady_samples_per_s_per_rank"] == 21.0 and out["steady_intervals"] == 2
    assert out["new_shape_buckets"] == 3
    out = scaling.summarise([{k: v for k, v in r.items() if k != "new_shape_buckets"} for r in recs], 1)
    assert "steady_intervals" not in out  # a run without shape buckets has no such column
    assert scaling.summarise(recs[1:2], 1)["steady_samples_per_s_per_rank"] is None
    # a compilation or CUDA-graph recording (torch's callbacks) also makes an interval not steady
    logged = [dict(r, compiles=c, cudagraph_records=g) for r, c, g in zip(recs, [0, 0, 2], [1, 0, 0])]
    out = scaling.summarise(logged, 1)
    assert out["steady_intervals"] == 0 and out["steady_samples_per_s_per_rank"] is None
    assert (out["compiles"], out["cudagraph_records"]) == (2, 1)
    logged[0]["cudagraph_records"] = 0
    assert scaling.summarise(logged, 1)["steady_samples_per_s_per_rank"] == 40.0
    assert "quiet_intervals" not in scaling.summarise(logged, 1)  # no collections logged: no quiet column


def test_quiet_intervals_also_leave_out_full_garbage_collections():
    scaling = _module()
    recs = [dict(step=s, samples_per_s=v, atoms_per_s=10 * v, peak_mem_gib=1.0, data_wait_frac=0.0,
                 new_shape_buckets=n, compiles=0, cudagraph_records=0, gc_full=g, gc_s=t)
            for s, v, n, g, t in [(20, 40.0, 0, 0, 0.01), (40, 10.0, 3, 1, 1.2), (60, 30.0, 0, 1, 1.1),
                                  (80, 44.0, 0, 0, 0.02)]]
    out = scaling.summarise(recs, 2)
    assert out["steady_intervals"] == 3 and out["steady_samples_per_s_per_rank"] == 114.0 / 3 / 2
    assert out["quiet_intervals"] == 2 and out["quiet_samples_per_s_per_rank"] == 21.0  # (40 + 44) / 2 / 2
    assert out["gc_full"] == 2 and abs(out["gc_s"] - 2.33) < 1e-9
    assert scaling.summarise(recs[2:3], 1)["quiet_samples_per_s_per_rank"] is None


def test_a_failing_run_is_reported_with_its_log(tmp_path, demo_data):
    proc = _scaling(tmp_path, demo_data, "--set", "optim.lrr=1")
    assert proc.returncode != 0
    assert "1-rank run exit codes" in proc.stderr and "optim.lrr" in proc.stderr


def _module():
    from bench import scaling

    return scaling


def test_profiled_steps_and_warm_up_are_not_timed():
    scaling = _module()
    records = [{"step": s} for s in range(20, 201, 20)]
    assert scaling.profiled_steps(["optim.lr=1", "log.profile_steps=[181,183]"]) == (181, 183)
    assert scaling.profiled_steps(["optim.lr=1"]) is None
    timed = scaling.timed_intervals(records, 120, 20, (181, 183))
    assert [r["step"] for r in timed] == [140, 160, 180]  # 121-140 ... 161-180; 181-200 was profiled
    assert [r["step"] for r in scaling.timed_intervals(records, 120, 20, None)] == [140, 160, 180, 200]
    proc = subprocess.run([sys.executable, "-m", "bench.scaling", "--ranks", "1", "--ds_config", "x",
                           "--config", "y", "--set", "log.every_steps=20"], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode != 0 and "--log-every" in proc.stderr


def _ranks_of(run_dir: Path) -> list[int]:
    """PIDs of trainer processes whose command line names `run_dir`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if proc.name.isdigit() and f"run_dir={run_dir}".encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def test_sigterm_to_the_tool_kills_its_ranks(tmp_path, demo_data):
    # `timeout` or scancel stop the tool with SIGTERM; ranks it left behind would keep their GPUs and
    # ports and hang or fail the next launch on that machine
    run_dir = tmp_path / "work" / "weak_1"
    cmd = [sys.executable, "-m", "bench.scaling", "--ranks", "1", "2",
           "--ds_config", str(HERE / "ds_zero2_cpu.json"), "--config", str(HERE / "tiny_run.yaml"),
           "--data", str(demo_data), "--micro-batch", "2", "--steps", "100000", "--skip", "2",
           "--work", str(tmp_path / "work"), "--timeout", "240"]
    tool = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").exists():  # the rank is training
            assert tool.poll() is None and time.time() < deadline, tool.stdout.read().decode()[-2000:]
            time.sleep(0.5)
        assert _ranks_of(run_dir)
        tool.send_signal(signal.SIGTERM)
        assert tool.wait(timeout=60) == 128 + signal.SIGTERM
        assert _ranks_of(run_dir) == []
        assert not (tmp_path / "work" / "weak_2").exists()  # and started no further launch
    finally:
        tool.kill()
        for pid in _ranks_of(run_dir):
            os.kill(pid, signal.SIGKILL)
