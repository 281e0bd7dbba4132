"""IS2RE/IS2RS inputs: OC20's LMDB layout (real torch_geometric records, read through the restricted
unpickler), the extxyz equivalent and eqv2 shards give the same structures and targets."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from eqv2.relaxation.inputs import InputError, read_inputs
from tests.relaxation.emt_set import write_is2r_extxyz, write_is2r_lmdb


def _same(got, want, atol):
    assert [s.sid for s in got] == [s.sid for s in want]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.numbers, w.numbers)
        np.testing.assert_allclose(g.positions, w.positions, atol=atol)
        np.testing.assert_allclose(g.target_positions, w.target_positions, atol=atol)
        np.testing.assert_allclose(g.cell, w.cell, atol=atol)
        np.testing.assert_array_equal(g.fixed, w.fixed)
        np.testing.assert_array_equal(g.tags, w.tags)
        assert g.target_energy == pytest.approx(w.target_energy, abs=1e-6)
        assert g.initial_energy == pytest.approx(w.initial_energy, abs=1e-6)


def test_lmdb_as_downloaded(tmp_path, emt_structures):
    write_is2r_lmdb(tmp_path / "data.lmdb", emt_structures)
    _same(list(read_inputs([str(tmp_path / "data.lmdb")])), emt_structures, atol=1e-5)  # float32 in the LMDB
    _same(list(read_inputs([str(tmp_path)])), emt_structures, atol=1e-5)  # a folder of *.lmdb


def test_extxyz_equivalent(tmp_path, emt_structures):
    write_is2r_extxyz(tmp_path / "set.extxyz", emt_structures)
    _same(list(read_inputs([str(tmp_path / "set.extxyz")])), emt_structures, atol=1e-8)


def test_lmdb_with_a_foreign_global_is_refused(tmp_path):
    import lmdb

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    env = lmdb.open(str(tmp_path / "bad.lmdb"), subdir=False, map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"0", pickle.dumps(Evil()))
        txn.put(b"length", pickle.dumps(1))
    env.close()
    with pytest.raises(InputError, match=r"bad.lmdb key 0: refusing to unpickle global builtins.print"):
        list(read_inputs([str(tmp_path / "bad.lmdb")]))


def test_missing_and_unreadable_inputs(tmp_path):
    with pytest.raises(InputError, match="input not found"):
        list(read_inputs([str(tmp_path / "nope.extxyz")]))
    (tmp_path / "junk.lmdb").write_text("not an lmdb")
    with pytest.raises(InputError, match="junk.lmdb: not a readable LMDB"):
        list(read_inputs([str(tmp_path / "junk.lmdb")]))
    (tmp_path / "junk.extxyz").write_text("3\nnot extxyz\nX 0 0\n")
    with pytest.raises(InputError, match="junk.extxyz"):
        list(read_inputs([str(tmp_path / "junk.extxyz")]))


def test_shards_give_initial_structures(tmp_path, emt_structures):
    """Initial structures (with EMT labels: tools/shard_ase.py requires them) sharded with --tags: ids, positions,
    fixed atoms (FixAtoms) come back; shards hold no relaxed references."""
    import subprocess
    import sys
    from pathlib import Path

    import ase.io
    from ase.calculators.emt import EMT

    write_is2r_extxyz(tmp_path / "plain.extxyz", emt_structures)
    frames = ase.io.read(tmp_path / "plain.extxyz", index=":")
    for atoms in frames:
        atoms.calc = EMT()
        atoms.get_forces()
    ase.io.write(tmp_path / "set.extxyz", frames)
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, str(repo / "tools/shard_ase.py"), str(tmp_path / "set.extxyz"), str(tmp_path / "shards"),
                    "--tags", "--system-key", "sid", "--shard-samples", "4", "--no-progress"], check=True, cwd=repo, timeout=180,
                   capture_output=True)
    got = {s.sid: s for s in read_inputs([str(tmp_path / "shards" / "manifest.json")])}
    keys = [f"{s.sid}_{i}" for i, s in enumerate(emt_structures)]  # shard ids: <sid>_<frame of the file>
    assert sorted(got) == sorted(keys)
    for key, w in zip(keys, emt_structures):
        g = got[key]
        np.testing.assert_allclose(g.positions, w.positions, atol=1e-5)  # float32 in the shard
        np.testing.assert_array_equal(g.fixed, w.fixed)
        np.testing.assert_array_equal(g.tags, w.tags)
        assert g.target_positions is None and g.target_energy is None
