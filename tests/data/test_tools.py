"""The data verbs on the demo data: `eqv2 demo-data`, `eqv2 inspect`, `eqv2 stats` (real processes)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from eqv2.data import DataConfig, TrainStream, load_stats, val_batches
from tests.verbs import run_eqv2


def _run(*args, check=True):
    return run_eqv2(*args, check=check)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("demo")
    t0 = time.time()
    _run("demo-data", "--out", out, "--quiet")
    return out, time.time() - t0


def test_demo_data_builds_fast_and_loads(demo):
    out, seconds = demo
    assert seconds < 60
    train, val = json.loads((out / "train/manifest.json").read_text()), json.loads((out / "val/manifest.json").read_text())
    assert 300 <= train["num_samples"] <= 500 and 60 <= val["num_samples"] <= 100
    assert 20 <= train["num_atoms"] / train["num_samples"] <= 40
    stats = load_stats(out / "train/stats.json")
    assert stats.energy_std > 0 and stats.forces_std > 0 and 0 < stats.avg_degree <= 20
    cfg = DataConfig(train_manifest=str(out / "train/manifest.json"), val_manifest=str(out / "val/manifest.json"),
                     batch_size=8, num_workers=2)
    ids = [i for r in range(2) for b in TrainStream(cfg, r, 2).epoch_batches(0) for i in b.ids]
    assert len(ids) == len(set(ids)) == train["num_samples"]
    batch = next(iter(val_batches(cfg, 0, 1)))
    assert set(batch.tags.tolist()) == {0, 1, 2} and batch.fixed.any() and not batch.fixed.all()
    assert bool((batch.fixed == (batch.tags == 0)).all())  # subsurface fixed, as in OC20


def test_demo_deterministic_by_seed(tmp_path):
    args = ["--train-systems", "3", "--val-systems", "2", "--frames", "4", "--quiet", "--workers", "1"]
    _run("demo-data", "--out", tmp_path / "a", *args)
    _run("demo-data", "--out", tmp_path / "b", *args)
    _run("demo-data", "--out", tmp_path / "c", "--seed", "5", *args)
    shards = lambda d: {p.name: p.read_bytes() for p in sorted((d / "train").glob("*.tar"))}
    assert shards(tmp_path / "a") == shards(tmp_path / "b") != shards(tmp_path / "c")


def test_inspect_and_stats_tools(demo, tmp_path):
    out, _ = demo
    r = _run("inspect", out / "val/manifest.json", "--show", "2", "--quiet")
    assert "good samples of" in r.stdout and "PROBLEM" not in r.stdout
    _run("stats", out / "val/manifest.json", "--degree-every", "1", "--out", tmp_path / "s.json",
         "--max-radius", "6", "--max-neighbors", "12", "--quiet")
    fresh, written = load_stats(tmp_path / "s.json"), load_stats(out / "val/stats.json")
    assert fresh.num_samples == written.num_samples and abs(fresh.energy_mean - written.energy_mean) < 1e-9
    assert abs(fresh.forces_std - written.forces_std) < 1e-9 and fresh.avg_degree == written.avg_degree
    # the demo data's stats are measured on the demo model's graph, and say so; the default is the paper's
    assert (written.degree_max_radius, written.degree_max_neighbors) == (6.0, 12)
    _run("stats", out / "val/manifest.json", "--degree-every", "1", "--out", tmp_path / "p.json",
         "--quiet")
    paper = load_stats(tmp_path / "p.json")
    assert (paper.degree_max_radius, paper.degree_max_neighbors) == (12.0, 20)
    assert paper.avg_degree > written.avg_degree
    # damage one shard: inspect names it and fails
    bad = tmp_path / "val"
    bad.mkdir()
    for p in (out / "val").iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    shard = sorted(bad.glob("*.tar"))[1]
    shard.write_bytes(shard.read_bytes()[:-3000])
    r = _run("inspect", bad / "manifest.json", "--quiet", check=False)
    assert r.returncode == 1 and f"PROBLEM: shard {shard}" in r.stdout
