"""The optional W&B logger: an offline run's own files hold the records of metrics.jsonl."""
from __future__ import annotations

import json

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
