"""`eqv2 shard-ase`: a user's own ASE-readable data (extxyz, traj, ASE db) -> shards -> batches, labels
checked against what ASE itself reads; splits without leakage; one-line errors; training on them."""
from __future__ import annotations

import subprocess
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.db import connect

from eqv2.data import DataConfig, TrainStream
from eqv2.data.reader import resolve_shards, read_shard
from tests.verbs import run_eqv2



def _frames(count: int, system: str, seed: int, metal: str = "Cu") -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        atoms = fcc111(metal, (2, 2, 3), vacuum=6.0)
        add_adsorbate(atoms, "O", 1.8, "fcc")
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        atoms.set_constraint(FixAtoms(indices=[0, 1, 2, 3]))
        atoms.info["system_id"] = system
        atoms.calc = EMT()
        labels = dict(energy=atoms.get_potential_energy(), forces=atoms.get_forces(), stress=atoms.get_stress())
        atoms.calc = SinglePointCalculator(atoms, **labels)
        out.append(atoms)
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ase")
    ase.io.write(d / "md_a.traj", _frames(5, "a", 0))
    ase.io.write(d / "set.extxyz", _frames(4, "b", 1) + _frames(3, "c", 2, "Ni"))
    (d / "sub").mkdir()
    db = connect(d / "sub" / "more.db")
    for atoms in _frames(3, "d", 3, "Pt"):
        db.write(atoms, system_id="d")
    return d


def _shard(*args: str) -> subprocess.CompletedProcess:
    return run_eqv2("shard-ase", *args, "--quiet")


def _samples(manifest: Path) -> dict[str, dict]:
    urls, infos, _ = resolve_shards(str(manifest), "")
    out = {}
    for url, info in zip(urls, infos):
        samples, _ = read_shard(url, info, True, "raise")
        out.update({f"{s['sid']}_{s['fid']}": s for s in samples})
    return out


def _expected(dataset: Path) -> dict[str, object]:
    out = {}
    for path, system in [(dataset / "md_a.traj", "md-a"), (dataset / "set.extxyz", "set"),
                         (dataset / "sub" / "more.db", "sub-more")]:
        for i, atoms in enumerate(ase.io.read(path, index=":")):
            out[f"{system}_{i}"] = atoms
    return out


def test_every_frame_of_every_format_keeps_its_labels(dataset, tmp_path):
    proc = _shard(str(dataset), str(tmp_path / "all"), "--shard-samples", "4")
    assert proc.returncode == 0, proc.stderr
    got, expected = _samples(tmp_path / "all" / "manifest.json"), _expected(dataset)
    assert sorted(got) == sorted(expected) and len(got) == 15
    for key, atoms in expected.items():
        s = got[key]
        np.testing.assert_allclose(s["positions"], atoms.positions, atol=1e-5)
        np.testing.assert_array_equal(s["numbers"], atoms.numbers)
        assert s["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(s["forces"], atoms.get_forces(apply_constraint=False), atol=1e-6)
        np.testing.assert_allclose(s["stress"], atoms.get_stress(voigt=False), atol=1e-6)
        np.testing.assert_array_equal(s["fixed"], np.arange(len(atoms)) < 4)
        assert "tags" not in s  # ASE's builders tag layers 1..3: not OC20 tags unless --tags
    cfg = DataConfig(train_manifest=str(tmp_path / "all" / "manifest.json"), batch_size=4, num_workers=0)
    assert sum(b.num_graphs for b in TrainStream(cfg, 0, 1).epoch_batches(0)) == 15


@pytest.mark.parametrize("split_by, extra", [("system", []), ("system", ["--system-key", "system_id"]),
                                             ("structure", [])])
def test_the_split_keeps_each_system_on_one_side(dataset, tmp_path, split_by, extra):
    out = tmp_path / "split"
    proc = _shard(str(dataset), str(out), "--shard-samples", "4", "--val-fraction", "0.5", "--split-by", split_by,
                  "--split-seed", "3", *extra)
    assert proc.returncode == 0, proc.stderr
    train, val = _samples(out / "train" / "manifest.json"), _samples(out / "val" / "manifest.json")
    assert not set(train) & set(val) and len(train) + len(val) == 15
    systems = lambda side: {s["sid"] for s in side.values()}  # noqa: E731
    if split_by == "system":
        assert not systems(train) & systems(val)
    # the same command again (2 reader processes) writes the same split
    again = _shard(str(dataset), str(tmp_path / "again"), "--shard-samples", "4", "--val-fraction", "0.5",
                   "--split-by", split_by, "--split-seed", "3", "--workers", "2", *extra)
    assert again.returncode == 0, again.stderr
    assert sorted(_samples(tmp_path / "again" / "val" / "manifest.json")) == sorted(val)


def test_labels_from_named_keys(dataset, tmp_path):
    frames = _frames(2, "k", 7)
    for atoms in frames:
        atoms.info["dft_energy"] = atoms.get_potential_energy() + 1.0
        atoms.arrays["dft_forces"] = atoms.get_forces() * 2.0
        atoms.calc = None
    ase.io.write(tmp_path / "keys.extxyz", frames)
    proc = _shard(str(tmp_path / "keys.extxyz"), str(tmp_path / "out"), "--shard-samples", "4",
                  "--energy-key", "dft_energy", "--forces-key", "dft_forces", "--stress-key", "none")
    assert proc.returncode == 0, proc.stderr
    got = _samples(tmp_path / "out" / "manifest.json")
    for i, atoms in enumerate(frames):
        assert got[f"keys_{i}"]["energy"] == pytest.approx(atoms.info["dft_energy"])
        np.testing.assert_allclose(got[f"keys_{i}"]["forces"], atoms.arrays["dft_forces"], atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--energy-key", "nope"], "set.extxyz frame 0: no energy (key 'nope' has none; name where it is with --energy-key)"),
    (["--system-key", "missing"], "frame 0: no info key 'missing' (--system-key)"),
    (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
])
def test_bad_input_is_one_line(dataset, tmp_path, args, message):
    proc = _shard(str(dataset / "set.extxyz"), str(tmp_path / "out"), "--shard-samples", "4", *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_a_missing_input_is_named(tmp_path):
    proc = _shard(str(tmp_path / "nothing.extxyz"), str(tmp_path / "out"), "--shard-samples", "4")
    assert proc.returncode == 2 and f"input not found: {tmp_path / 'nothing.extxyz'}" in proc.stderr


def test_a_run_trains_on_the_shards(dataset, tmp_path):
    from tests.train.conftest import HERE, run_train

    out = tmp_path / "split"
    proc = _shard(str(dataset), str(out), "--shard-samples", "4", "--val-fraction", "0.3")
    assert proc.returncode == 0, proc.stderr
    # the tiny run's model graph is 6 Å / 12: its avg_degree is measured on that graph, as docs/data.md says
    stats = run_eqv2("stats", out / "train" / "manifest.json", "--max-radius", "6", "--max-neighbors", "12",
                 "--out", out / "train" / "stats.json")
    assert stats.returncode == 0, stats.stderr
    rc, log = run_train(["--ds_config", str(HERE / "ds_zero2_cpu.json"), "--config", str(HERE / "tiny_run.yaml"),
                         "--set", f"data.train_manifest={out / 'train' / 'manifest.json'}",
                         "--set", f"data.val_manifest={out / 'val' / 'manifest.json'}",
                         "--set", f"run_dir={tmp_path / 'run'}", "--set", "optim.max_steps=2"])
    assert rc == [0], log
    assert "eval val step 2" in log


def test_unlabelled_frames_shard_with_unlabelled_only(tmp_path):
    """A test split without energies or forces: refused naming the frame, or sharded with --unlabelled
    (positions and ids kept, no labels)."""
    frames = _frames(3, "t", 5)
    for atoms in frames:
        atoms.calc = None
    ase.io.write(tmp_path / "test.extxyz", frames)
    proc = _shard(str(tmp_path / "test.extxyz"), str(tmp_path / "refused"), "--shard-samples", "4")
    assert proc.returncode == 2 and "test.extxyz frame 0: no energy and no forces" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _shard(str(tmp_path / "test.extxyz"), str(tmp_path / "out"), "--shard-samples", "4", "--unlabelled")
    assert proc.returncode == 0, proc.stderr
    urls, infos, _ = resolve_shards(str(tmp_path / "out" / "manifest.json"), "")
    samples = [s for url, info in zip(urls, infos) for s in read_shard(url, info, True, "raise", bounds=None)[0]]
    assert len(samples) == 3 and all(s.get("energy") is None and s.get("forces") is None for s in samples)
    np.testing.assert_allclose(samples[0]["positions"], frames[0].positions, atol=1e-6)
