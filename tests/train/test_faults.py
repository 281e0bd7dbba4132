"""The trainer's fault model (docs/training.md, "Faults"): a run directory, a checkpoint or an engine
config that cannot be used is refused before step 1 with a message naming it, and nothing of an
existing run is touched; a damaged newest checkpoint falls back to the previous one."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from eqv2.train import main
from eqv2.training import checkpointing as ckpt
from eqv2.training.signals import EXIT_CONFIG
from tests.train.conftest import HERE, REPO, TRAIN, common_args, data_args, launcher_env, records, run_train

DS = str(HERE / "ds_zero2_cpu.json")
RUN = str(HERE / "tiny_run.yaml")


def _digests(run_dir: Path) -> dict[str, str]:
    """Every file of a run directory and its SHA-256."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _short(demo_data: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [*common_args(demo_data, run_dir), "--set", f"optim.max_steps={steps}", *extra]


@pytest.fixture(scope="module")
def finished_run(demo_data, tmp_path_factory) -> Path:
    """A finished 8-step run (checkpoints at steps 4 and 8), launched with the `deepspeed` command."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    env = launcher_env()
    proc = subprocess.run(["deepspeed", str(TRAIN), *_short(demo_data, run_dir, 8)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ckpt.complete_tags(run_dir / "checkpoints") == ["step_00000004", "step_00000008"]
    return run_dir


def _copy(run_dir: Path, to: Path) -> Path:
    subprocess.run(["cp", "-a", str(run_dir), str(to)], check=True)
    return to


def test_fresh_run_into_an_existing_run_is_refused_and_touches_nothing(finished_run, demo_data, tmp_path):
    run_dir = _copy(finished_run, tmp_path / "run")
    before = _digests(run_dir)
    rc, out = run_train(_short(demo_data, run_dir, 8, "--set", "seed=7", "--set", "optim.lr=1e-3"))
    assert rc == [EXIT_CONFIG], out
    assert f"run_dir {run_dir} already holds a run" in out and "--resume auto" in out
    assert _digests(run_dir) == before  # checkpoints, best.json, config.yaml, metrics.jsonl: all as they were


def test_a_requested_save_is_written_even_where_latest_names_its_step(finished_run, demo_data, tmp_path):
    """Resuming from step 4 with another learning rate and training to step 8 again: step 8's checkpoint
    must hold the new weights (the old code skipped the save because `latest` already named step 8)."""
    run_dir = _copy(finished_run, tmp_path / "run")
    model_file = run_dir / "checkpoints" / "step_00000008" / "mp_rank_00_model_states.pt"
    old = hashlib.sha256(model_file.read_bytes()).hexdigest()
    rc, out = run_train(_short(demo_data, run_dir, 8, "--set", "optim.lr=1e-4",
                               "--resume", str(run_dir / "checkpoints" / "step_00000004")))
    assert rc == [0], out
    assert hashlib.sha256(model_file.read_bytes()).hexdigest() != old
    assert json.loads((run_dir / "checkpoints" / "step_00000008" / ckpt.STATE_FILE).read_text())["config"][
        "optim"]["lr"] == 1e-4


def test_resume_into_a_run_of_another_model_names_the_keys_and_touches_nothing(finished_run, demo_data, tmp_path):
    run_dir = _copy(finished_run, tmp_path / "run")
    before = _digests(run_dir)
    rc, out = run_train(_short(demo_data, run_dir, 12, "--set", "model.num_layers=3", "--set",
                               "model.sphere_channels=16", "--resume", "auto"))
    assert rc == [EXIT_CONFIG], out
    assert "model.num_layers: checkpoint 2, this config 3" in out
    assert "model.sphere_channels: checkpoint 8, this config 16" in out
    assert "size mismatch" not in out
    assert _digests(run_dir) == before


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(finished_run, demo_data, tmp_path):
    """step 8 is marked complete but one of its files lost its tail (a full disk during a copy):
    --resume auto names the file, continues from step 4 and repeats steps 5-8 exactly."""
    run_dir = _copy(finished_run, tmp_path / "run")
    bad = run_dir / "checkpoints" / "step_00000008" / "mp_rank_00_model_states.pt"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    reference, _ = records(finished_run)
    rc, out = run_train(_short(demo_data, run_dir, 8, "--resume", "auto"))
    assert rc == [0], out
    assert f"checkpoint {bad.parent} is damaged ({bad} has" in out and "falling back" in out
    assert "resumed from" in out and "step_00000004 (step 4" in out
    train, _ = records(run_dir)
    for step in range(5, 9):
        assert train[step]["loss"] == reference[step]["loss"], step
    # asked for by name, a damaged checkpoint is an error naming the file, not a fallback
    bad.write_bytes(bad.read_bytes()[:100])
    rc, out = run_train(_short(demo_data, run_dir, 8, "--resume", str(bad.parent)))
    assert rc == [EXIT_CONFIG], out
    assert f"checkpoint damaged: {bad} has 100 bytes" in out


def test_checkpoint_that_cannot_be_loaded_names_it_and_an_earlier_one(finished_run, demo_data, tmp_path):
    """Same size, other bytes (a file replaced after the save): DeepSpeed's load fails; the message
    names the checkpoint and the command that continues from the previous one."""
    run_dir = _copy(finished_run, tmp_path / "run")
    bad = run_dir / "checkpoints" / "step_00000008" / "mp_rank_00_model_states.pt"
    bad.write_bytes(b"\0" * bad.stat().st_size)
    rc, out = run_train(_short(demo_data, run_dir, 12, "--resume", "auto"))
    assert rc == [EXIT_CONFIG], out
    assert f"checkpoint {bad.parent} cannot be loaded" in out
    assert f"--resume {run_dir / 'checkpoints' / 'step_00000004'}" in out
    assert "Traceback" not in out


@pytest.mark.parametrize("blocker", ["checkpoints", "parent"])
def test_unwritable_checkpoint_directory_is_found_before_step_one(demo_data, tmp_path, blocker):
    """Root ignores permission bits, so the directory is made uncreatable by a file in its place."""
    if blocker == "checkpoints":
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        (run_dir / "checkpoints").write_text("not a directory")
        where = run_dir / "checkpoints"
    else:
        (tmp_path / "file").write_text("not a directory")
        run_dir = where = tmp_path / "file" / "run"
    rc, out = run_train(_short(demo_data, run_dir, 4))
    assert rc == [EXIT_CONFIG], out
    assert f"checkpoint directory {run_dir / 'checkpoints'} is not writable" in out
    assert "step 1" not in out and not (run_dir / "metrics.jsonl").exists(), where


@pytest.mark.parametrize("change, message", [
    ({"zero_optimizaton": {"stage": 1}}, "unknown DeepSpeed config key 'zero_optimizaton' (did you mean "
                                         "'zero_optimization'?)"),
    ({"gradient_clippin": 1.0}, "unknown DeepSpeed config key 'gradient_clippin'"),
    ({"bf16": {"enabled": True}}, "bf16.enabled is not supported"),
    ({"zero_optimization": {"stage": 2, "overlap_com": True}}, "DeepSpeed rejects this config"),
    ({"torch_autocast": {"enabled": True, "dtype": "float16"}}, "torch_autocast.dtype 'float16' is not supported"),
    ({"gradient_clipping": -1.0}, "gradient_clipping must be a number >= 0"),
])
def test_ds_config_mistakes_are_errors_naming_the_key(capsys, demo_data, tmp_path, change, message):
    ds = {**json.loads(Path(DS).read_text()), **change}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    assert main(["--ds_config", str(path), "--config", RUN, *data_args(demo_data),
                 "--set", f"run_dir={tmp_path / 'run'}"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert message in err and str(path) in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value", [("optim.max_steps", -5), ("optim.max_steps", 0),
                                        ("optim.max_epochs", -1.0), ("optim.warmup_steps", -2)])
def test_run_lengths_that_cannot_work_are_errors(capsys, demo_data, tmp_path, key, value):
    overrides = ["--set", f"{key}={value}"] + (["--set", "optim.max_steps=null"] if "epochs" in key else [])
    assert main(["--ds_config", DS, "--config", RUN, *data_args(demo_data), *overrides,
                 "--set", f"run_dir={tmp_path / 'run'}"]) == EXIT_CONFIG
    assert f"{key} must be" in capsys.readouterr().err


def test_auto_resume_without_a_checkpoint_keeps_the_earlier_attempts_records(demo_data, tmp_path):
    """An attempt that ended before its first save leaves metrics but no checkpoint: the requeued job
    starts fresh and keeps those records apart from its own."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    rc, out = run_train(_short(demo_data, run_dir, 2, "--set", "checkpoint.every_steps=100", "--resume", "auto"))
    assert rc == [0], out
    assert (run_dir / "metrics.attempt1.jsonl").read_text() == '{"step": 1, "loss": 9.0}\n'
    train, _ = records(run_dir)
    assert sorted(train) == [1, 2] and train[1]["loss"] != 9.0
