"""The optional W&B logger: an offline run's own files hold the records of metrics.jsonl."""
from __future__ import annotations

import json
import os

import pytest

from eqv2.config import ConfigError
from eqv2.training.wandb_log import WandbConfig
from tests.train.conftest import HERE, data_args, run_train


def _history(run_file) -> list[dict]:
    """The history rows of an offline W&B run, read back with wandb's own reader of its .wandb file."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(str(run_file))
    rows = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_offline_run_logs_train_and_validation_records(demo_data, tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'eqv2[wandb]')")
    run_dir = tmp_path / "run"
    rc, out = run_train(["--ds_config", str(HERE / "ds_zero2_cpu.json"), "--config", str(HERE / "tiny_run.yaml"),
                         *data_args(demo_data), "--set", f"run_dir={run_dir}", "--set", "optim.max_steps=2",
                         "--set", "log.every_steps=1", "--set", "log.wandb.enabled=true",
                         "--set", "log.wandb.mode=offline"])
    assert rc == [0], out
    run_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, list((run_dir / "wandb").rglob("*"))
    rows = _history(run_files[0])
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in jsonl if "split" not in r]
    val = [r for r in jsonl if r.get("split") == "val"]
    assert train and val
    by_step = {}
    for row in rows:
        by_step.setdefault(row["_step"], {}).update(row)
    for rec in train:
        assert by_step[rec["step"]]["train/loss"] == pytest.approx(rec["loss"])
    for rec in val:
        assert by_step[rec["step"]]["val/val/forces_mae"] == pytest.approx(rec["forces_mae"])


def test_bad_mode_names_the_key():
    with pytest.raises(ConfigError, match="log.wandb.mode"):
        WandbConfig(mode="cloud")


def test_missing_wandb_stops_every_rank_at_start_with_the_install_command(demo_data, tmp_path, monkeypatch):
    """log.wandb.enabled without wandb installed: both ranks exit 2 at start with one line naming the
    key and the install command, no traceback, and nothing of the run is written.  A `wandb` package
    on PYTHONPATH whose import raises ImportError stands for the absent one (whether or not wandb is
    installed here)."""
    absent = tmp_path / "no_wandb" / "wandb"
    absent.mkdir(parents=True)
    (absent / "__init__.py").write_text('raise ImportError("No module named \'wandb\'")\n')
    monkeypatch.setenv("PYTHONPATH", f"{absent.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    run_dir = tmp_path / "run"
    rc, out = run_train(["--ds_config", str(HERE / "ds_zero2_cpu.json"), "--config", str(HERE / "tiny_run.yaml"),
                         *data_args(demo_data), "--set", f"run_dir={run_dir}", "--set", "log.wandb.enabled=true"],
                        nproc=2, timeout=120)
    assert rc == [2, 2], out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if "wandb" in line]
    assert errors == ["eqv2.train: config error: log.wandb.enabled: wandb is not installed "
                      "(pip install 'eqv2[wandb]')"] * 2, out
    assert not (run_dir / "config.yaml").exists() and "launch" not in out, out
