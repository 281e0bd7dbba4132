"""Bad samples in a real training run (issue 20, cases 4, 5, 10): by default the run stops before
training on them with one line naming shard and sample (exit 2); with data.on_error: skip they are
left out and counted in metrics.jsonl and the TensorBoard scalars as they happen."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from eqv2.data.format import encode_sample, sample_key
from eqv2.data.manifest import load_manifest
from eqv2.data.reader import read_shard
from eqv2.training.signals import EXIT_CONFIG, EXIT_OK
from tests.data.conftest import write_uneven
from tests.train.conftest import HERE, records, run_train

SHARDS, PER_SHARD = 8, 10
HUGE, BARE = 13, 57  # sample positions given an energy of 1e30 / written without forces


@pytest.fixture(scope="module")
def bad_data(demo_data, tmp_path_factory) -> tuple[Path, list[str]]:
    """The first 80 demo structures re-sharded, two of them bad as an unchecked writer would leave them."""
    out = tmp_path_factory.mktemp("bad_data")
    manifest = load_manifest(demo_data / "train" / "manifest.json")
    samples = []
    for info in manifest.shards:
        loaded, _ = read_shard(str(demo_data / "train" / info.name), info, True, "raise")
        samples += [{k: (v.copy() if hasattr(v, "copy") else v) for k, v in s.items()} for s in loaded]
    samples = samples[: SHARDS * PER_SHARD]
    bad = {}
    for index, change in ((HUGE, {"energy": 1e30}), (BARE, {"forces": None})):
        s = samples[index]
        bad[sample_key(s["sid"], s["fid"])] = encode_sample(dict(s, **change))  # encode_sample checks no labels
    write_uneven(out / "train", samples, [PER_SHARD] * SHARDS, payloads=bad)
    huge_only = {k: v for k, v in bad.items() if k == sample_key(samples[HUGE]["sid"], samples[HUGE]["fid"])}
    write_uneven(out / "train_energy", samples, [PER_SHARD] * SHARDS, payloads=huge_only)
    for split in ("train", "train_energy"):
        shutil.copy(demo_data / "train" / "stats.json", out / split / "stats.json")
    (out / "ds.json").write_text(json.dumps({**json.loads((HERE / "ds_zero2_cpu.json").read_text()),
                                             "tensorboard": {"enabled": True}}))
    return out, list(bad)


def _args(data: Path, demo_data: Path, run_dir: Path, *sets: str) -> list[str]:
    return ["--ds_config", str(data / "ds.json"), "--config", str(HERE / "tiny_run.yaml"),
            "--set", f"data.train_manifest={data / 'train' / 'manifest.json'}",
            "--set", f"data.val_manifest={demo_data / 'val' / 'manifest.json'}",
            "--set", f"run_dir={run_dir}", "--set", "data.num_workers=1", "--set", "optim.max_steps=20",
            *[a for s in sets for a in ("--set", s)]]


@pytest.mark.parametrize("split", ["train", "train_energy"])
def test_bad_sample_stops_the_run_naming_it(bad_data, demo_data, tmp_path, split):
    data, (huge, bare) = bad_data
    rc, out = run_train(_args(data, demo_data, tmp_path / "run", f"data.train_manifest={data / split / 'manifest.json'}"))
    assert rc == [EXIT_CONFIG], out
    lines = [line for line in out.splitlines() if line.startswith("eqv2.train (rank 0): ")]
    assert len(lines) == 1 and "Traceback" not in out, out
    if split == "train":  # the shuffled order meets the sample without forces first
        assert lines[0].endswith(f"/train/shard-000005.tar sample {bare}: no forces (eqv2 trains on energies and "
                                 f"forces; every sample needs both)"), lines
    else:
        assert f"/train_energy/shard-000001.tar sample {huge}: |energy| per atom is" in lines[0], lines
        assert lines[0].endswith("(if real, raise --max-energy-per-atom when sharding, data.max_energy_per_atom "
                                 "when training)"), lines
    assert "step 1/" not in out  # found as the shards were loaded, before any step trained on them


def test_skipped_samples_are_logged_as_they_happen(bad_data, demo_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data, keys = bad_data
    run_dir = tmp_path / "run"
    rc, out = run_train(_args(data, demo_data, run_dir, "data.on_error=skip"))
    assert rc == [EXIT_OK], out
    train, _ = records(run_dir)
    assert sorted(train) == list(range(1, 21))  # one epoch: 80 samples, 2 per micro-batch, 2 micro-batches
    per_step = [train[s]["skipped_samples"] for s in sorted(train)]
    totals = [train[s]["skipped_samples_total"] for s in sorted(train)]
    assert sum(per_step) == 2 and per_step.count(1) == 2, per_step  # each counted at the step that met it
    assert totals[-1] == 2 and totals == [sum(per_step[: k + 1]) for k in range(20)]
    assert all(key in out for key in keys)  # each skip named in the log
    events = EventAccumulator(str(next(run_dir.rglob("events.out.tfevents*")).parent))
    events.Reload()
    scalars = {e.step: e.value for e in events.Scalars("Train/skipped_samples_total")}
    assert scalars[20] == 2 and sum(e.value for e in events.Scalars("Train/skipped_samples")) == 2
