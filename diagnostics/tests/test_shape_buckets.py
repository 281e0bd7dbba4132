"""diagnostics/shape_buckets.py predicts the new padded shapes a run meets; the trainer logs them (2 CPU ranks)."""
import json
import subprocess
import sys

from tests.train.conftest import HERE, REPO, data_args, records, run_train


def test_the_tool_predicts_the_shapes_the_trainer_logs(tmp_path, demo_data):
    ds = json.loads((HERE / "ds_zero2_cpu.json").read_text())
    ds["gradient_accumulation_steps"] = 1  # one micro-batch per step, as the tool assumes
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    sets = [*data_args(demo_data), "--set", "execution.pad_atoms_multiple=16",
            "--set", "execution.pad_edges_multiple=64"]
    run_dir = tmp_path / "run"
    rc, out = run_train(["--ds_config", str(tmp_path / "ds.json"), "--config", str(HERE / "tiny_run.yaml"), *sets,
                         "--set", f"run_dir={run_dir}", "--set", "optim.max_steps=10",
                         "--set", "checkpoint.every_steps=1000"], nproc=2, timeout=600)
    assert rc == [0, 0], out[-3000:]
    train, _ = records(run_dir)  # logged every step (tiny_run.yaml)
    logged = [train[s]["new_shape_buckets"] for s in range(1, 11)]

    proc = subprocess.run([sys.executable, "-m", "diagnostics.shape_buckets", "--config",
                           str(HERE / "tiny_run.yaml"), "--micro-batch", "2", "--ranks", "2", "--steps", "10",
                           "--log-every", "2", *sets, "--out", str(tmp_path / "buckets.json")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "buckets.json").read_text())
    predicted = [sum(s in r["new_at_steps"] for r in result["ranks"]) for s in range(1, 11)]
    assert logged == predicted, (logged, predicted)
    assert predicted[0] == 2 and sum(predicted) > 2  # both ranks' first batch, and more shapes later
    quiet = [end for end in range(2, 11, 2) if predicted[end - 2] == predicted[end - 1] == 0]
    assert result["quiet_intervals"] == quiet
    # the replayed batches are the trainer's: per step, the ranks' padded atom counts are their atoms
    # plus 1..16 (pad_atoms_multiple=16), against the atoms the trainer logged over both ranks
    for s in range(1, 11):
        logged_atoms = round(train[s]["atoms_per_s"] / train[s]["steps_per_s"])
        padded = sum(result["padded"][r][s - 1][0] for r in range(2))
        assert logged_atoms + 2 <= padded <= logged_atoms + 32, (s, logged_atoms, padded)
    assert result["imbalance"]["max_over_mean_atoms"] >= 1.0 and result["imbalance"]["max_over_mean_edges"] >= 1.0


def test_imbalance_is_the_slowest_rank_over_the_mean():
    from diagnostics import shape_buckets as tool

    # two ranks, two steps: (atoms, edges) per step
    out = tool.imbalance([[(32, 512), (32, 1024)], [(64, 512), (32, 512)]])
    assert out["max_over_mean_atoms"] == (64 / 48 + 1.0) / 2
    assert out["max_over_mean_edges"] == (1.0 + 1024 / 768) / 2
    assert "max_over_mean_edges" not in tool.imbalance([[(32, 0)], [(48, 0)]])  # no graphs in the loader


def test_a_config_without_shape_buckets_is_refused(demo_data):
    proc = subprocess.run([sys.executable, "-m", "diagnostics.shape_buckets", "--config",
                           str(HERE / "tiny_run.yaml"), "--micro-batch", "2", "--steps", "4", *data_args(demo_data),
                           "--set", "execution.pad_atoms_multiple=0", "--set", "execution.pad_edges_multiple=0"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2 and "execution.pad_atoms_multiple" in proc.stderr
