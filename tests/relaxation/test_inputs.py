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
