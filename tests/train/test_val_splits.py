"""Several validation splits: each evaluated exactly (every sample once), logged under its name."""
from __future__ import annotations

from eqv2.train import main
from eqv2.training.signals import EXIT_CONFIG
from tests.train.conftest import HERE, data_args, records, run_train


def test_every_validation_split_is_evaluated(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    rc, out = run_train(["--ds_config", str(HERE / "ds_zero2_cpu.json"), "--config", str(HERE / "tiny_run.yaml"),
                         *data_args(demo_data), "--set", f"run_dir={run_dir}", "--set", "optim.max_steps=4",
                         "--set", "eval.max_batches=0",
                         "--set", f"data.extra_val_manifests.train_as_val={demo_data / 'train' / 'manifest.json'}"],
                        nproc=2)
    assert rc == [0, 0], out
    _, evals = records(run_dir)
    final = {e["split"]: e for e in evals if e["step"] == 4}
    assert final["val"]["num_structures"] == 80 and final["train_as_val"]["num_structures"] == 400
    assert "eval train_as_val step 4" in out


def test_missing_extra_validation_manifest_is_named(demo_data, tmp_path, capsys):
    # the trainer's main() in this process (a traceback would fail the test): cheaper than a launch
    assert main(["--ds_config", str(HERE / "ds_zero2_cpu.json"), "--config", str(HERE / "tiny_run.yaml"),
                 *data_args(demo_data), "--set", f"run_dir={tmp_path / 'run'}",
                 "--set", f"data.extra_val_manifests.ood={tmp_path / 'nope.json'}"]) == EXIT_CONFIG
    assert "data.extra_val_manifests.ood" in capsys.readouterr().err


def test_an_empty_val_manifest_turns_validation_off(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    rc, out = run_train(["--ds_config", str(HERE / "ds_zero2_cpu.json"), "--config", str(HERE / "tiny_run.yaml"),
                         *data_args(demo_data), "--set", f"run_dir={run_dir}", "--set", "optim.max_steps=2",
                         "--set", "data.val_manifest="])
    assert rc == [0], out
    train, evals = records(run_dir)
    assert sorted(train) == [1, 2] and evals == []

