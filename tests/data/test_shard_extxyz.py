"""Raw OC20 extxyz -> shards -> batches, checked against ASE's own reader; sharder determinism."""
from __future__ import annotations

import json
import lzma
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest

from eqv2.data import DataConfig, TrainStream, load_stats
from eqv2.data.manifest import load_manifest

from .conftest import oc20_frames, shard_raw, write_raw
from tests.verbs import REPO, run_eqv2, eqv2_cmd



@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("raw")
    write_raw(d, oc20_frames(45, seed=3), per_file=10)
    # one file compressed, as OC20's downloads are
    xz = d / "data_004.extxyz"
    (d / "data_004.extxyz.xz").write_bytes(lzma.compress(xz.read_bytes()))
    xz.unlink()
    return d


def _expected(raw: Path) -> dict[str, dict]:
    """What ASE itself reads from the raw files (independent of eqv2's parser)."""
    out = {}
    for f in sorted(raw.glob("data_*.extxyz*")):
        txt = f.with_name(f.name.split(".")[0] + ".txt").read_text().split()
        for atoms, line in zip(ase.io.read(f, index=":", format="extxyz"), txt):
            sid, fid, ref = line.split(",")
            fixed = np.zeros(len(atoms), bool)
            fixed[atoms.constraints[0].get_indices()] = True
            out[f"{sid[6:]}_{fid[5:]}"] = dict(
                pos=atoms.positions.astype(np.float32), z=atoms.numbers, cell=atoms.cell.array.astype(np.float32),
                tags=atoms.get_tags(), fixed=fixed, forces=atoms.get_forces(apply_constraint=False).astype(np.float32),
                energy=np.float32(atoms.get_potential_energy() - float(ref)))
    return out


def test_extxyz_to_batches_exact(raw, tmp_path):
    manifest = shard_raw(raw, tmp_path / "shards", shard_samples=7)
    assert manifest.num_samples == 45 and [s.count for s in manifest.shards] == [7] * 6 + [3]
    expected = _expected(raw)
    cfg = DataConfig(train_manifest=str(tmp_path / "shards/manifest.json"), batch_size=4, num_workers=0)
    seen = 0
    for batch in TrainStream(cfg, 0, 1).epoch_batches(0):
        for b, key in enumerate(batch.ids):
            e, m = expected[key], batch.batch == b
            np.testing.assert_array_equal(batch.pos[m].numpy(), e["pos"])
            np.testing.assert_array_equal(batch.atomic_numbers[m].numpy(), e["z"])
            np.testing.assert_array_equal(batch.cell[b].numpy(), e["cell"])
            np.testing.assert_array_equal(batch.tags[m].numpy(), e["tags"])
            np.testing.assert_array_equal(batch.fixed[m].numpy(), e["fixed"])
            np.testing.assert_array_equal(batch.forces[m].numpy(), e["forces"])
            assert batch.energy[b].item() == e["energy"]
            seen += 1
    assert seen == len(expected) == 45
    stats = load_stats(tmp_path / "shards/stats.json")
    energies = np.array([float(v["energy"]) for v in expected.values()], np.float64)
    assert stats.num_samples == 45 and abs(stats.energy_mean - energies.mean()) < 1e-5
    assert abs(stats.energy_std - energies.std()) < 1e-5
    assert 0 < stats.avg_degree <= 20


def _tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "progress.jsonl"}


def test_deterministic_across_worker_counts_and_resume(raw, tmp_path):
    shard_raw(raw, tmp_path / "a", shard_samples=6, workers=1)
    shard_raw(raw, tmp_path / "b", shard_samples=6, workers=2)
    ref = _tree(tmp_path / "a")
    assert ref == _tree(tmp_path / "b")
    # a run killed after shard 3 was journalled, while shard 4 was half written
    c = tmp_path / "c"
    shutil.copytree(tmp_path / "a", c)
    journal = (c / "progress.jsonl").read_text().splitlines()
    (c / "progress.jsonl").write_text("\n".join(journal[:4]) + "\n" + journal[4][:30])
    (c / "shard-000004.tar").rename(c / "shard-000004.tar.tmp")
    (c / "shard-000004.tar.tmp").write_bytes(b"partial")
    for p in ["manifest.json", "stats.json", "shard-000005.tar", "shard-000006.tar", "shard-000007.tar"]:
        (c / p).unlink()
    kept = (c / "shard-000002.tar").stat().st_mtime_ns
    shard_raw(raw, c, shard_samples=6)
    assert _tree(c) == ref
    assert (c / "shard-000002.tar").stat().st_mtime_ns == kept  # finished shards are not rewritten


def test_cli_killed_then_rerun_is_byte_identical(raw, tmp_path):
    cmd = lambda out: eqv2_cmd("shard", raw, out, "--shard-samples", "2", "--quiet", "--degree-every", "0")
    subprocess.run(cmd(tmp_path / "ref"), check=True, capture_output=True, cwd=REPO)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        j = out / "progress.jsonl"
        if j.exists() and j.read_text().count("\n") >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sharder finished before it could be killed"
    assert len(list(out.glob("shard-*.tar"))) < 23
    subprocess.run(cmd(out), check=True, capture_output=True, cwd=REPO)
    assert _tree(out) == _tree(tmp_path / "ref")
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 45


def test_cli_help():
    r = run_eqv2("shard", "--help")
    assert r.returncode == 0 and "--subtract-reference" in r.stdout and "--shard-bytes" in r.stdout


def test_shard_bytes_bound(raw, tmp_path):
    from eqv2.data.sharding import shard_sources
    from eqv2.data.extxyz import find_inputs, read_source
    import functools

    m = shard_sources([str(f) for f in find_inputs(raw)], functools.partial(read_source, False), tmp_path, "s", 0,
                      20_000, 1, 0, "total", "t", progress=False)
    assert len(m.shards) > 2 and all(s.bytes <= 20_000 + 1024 + 10240 for s in m.shards)
    assert load_manifest(tmp_path / "manifest.json").num_samples == 45
