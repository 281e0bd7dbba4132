"""fairchem LMDB -> shards, both PyG eras and naming conventions; malicious pickles are refused."""
from __future__ import annotations

import copyreg
import io
import pickle
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
import torch.storage
from torch_geometric.data import Data

from eqv2.data import DataConfig, TrainStream
from eqv2.data.lmdb_source import UnsafePickleError, read_lmdb, restricted_loads, write_lmdb

from .conftest import oc20_frames, with_energy
from tests.verbs import run_eqv2



def _pyg1_pickle(fields: dict) -> bytes:
    """A real Data object pickled as PyG 1 did: the Data class, fields as a plain __dict__ state."""
    record = Data()

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if obj is record:
                return copyreg.__newobj__, (Data,), dict(fields)
            return NotImplemented

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(record)
    return buf.getvalue()


def _pyg1_lmdb(path: Path, samples: list[dict]) -> None:
    env = lmdb.open(str(path), subdir=False, map_size=1 << 30)
    with env.begin(write=True) as txn:
        for i, s in enumerate(samples):
            fields = dict(pos=torch.tensor(s["positions"], dtype=torch.float32),
                          cell=torch.tensor(np.asarray(s["cell"]), dtype=torch.float32)[None],
                          atomic_numbers=torch.tensor(s["numbers"], dtype=torch.float32), natoms=len(s["numbers"]),
                          tags=torch.tensor(s["tags"]), fixed=torch.tensor(s["fixed"], dtype=torch.float32),
                          sid=torch.tensor([int(s["sid"])]), fid=int(s["fid"]),
                          energy=torch.tensor([s["energy"]]), forces=torch.tensor(s["forces"], dtype=torch.float32))
            txn.put(str(i).encode(), _pyg1_pickle(fields))
        txn.put(b"length", pickle.dumps(len(samples)))
    env.close()


@pytest.fixture(scope="module")
def lmdb_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmdb")
    samples = with_energy(oc20_frames(30, seed=11))
    write_lmdb(d / "data.0000.lmdb", samples[:12])  # PyG 2 records, y / force
    _pyg1_lmdb(d / "data.0001.lmdb", samples[12:])  # PyG 1 records, energy / forces
    return d, samples


def test_lmdb_to_shards_round_trip(lmdb_dir, tmp_path):
    d, samples = lmdb_dir
    out = tmp_path / "shards"
    r = run_eqv2("shard-lmdb", d, out, "--shard-samples", "8", "--workers", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    cfg = DataConfig(train_manifest=str(out / "manifest.json"), batch_size=5, num_workers=0)
    by_id = {f"{s['sid']}_{s['fid']}": s for s in samples}
    seen = set()
    for batch in TrainStream(cfg, 0, 1).epoch_batches(0):
        for b, key in enumerate(batch.ids):
            s, m = by_id[key], batch.batch == b
            np.testing.assert_array_equal(batch.pos[m].numpy(), s["positions"].astype(np.float32))
            np.testing.assert_array_equal(batch.forces[m].numpy(), s["forces"].astype(np.float32))
            np.testing.assert_array_equal(batch.atomic_numbers[m].numpy(), s["numbers"])
            np.testing.assert_array_equal(batch.fixed[m].numpy(), s["fixed"])
            np.testing.assert_array_equal(batch.tags[m].numpy(), s["tags"])
            np.testing.assert_array_equal(batch.cell[b].numpy(), np.asarray(s["cell"], np.float32))
            assert batch.energy[b].item() == np.float32(s["energy"])
            seen.add(key)
    assert seen == set(by_id)


class _Evil:
    def __reduce__(self):
        return (exec, ("open(%r, 'w').write('pwned')" % self.target,))


def test_malicious_pickle_refused_without_running(tmp_path):
    target = tmp_path / "pwned"
    evil = _Evil()
    evil.target = str(target)
    payload = pickle.dumps(evil)
    with pytest.raises(UnsafePickleError, match=r"x.lmdb key 3: refusing to unpickle global builtins.exec"):
        restricted_loads(payload, "x.lmdb key 3")
    assert not target.exists()
    # the same payload inside an LMDB record, via the sharding reader
    env = lmdb.open(str(tmp_path / "bad.lmdb"), subdir=False, map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"0", pickle.dumps(Data(pos=torch.zeros(1, 3))))
        txn.put(b"0", payload)
        txn.put(b"length", pickle.dumps(1))
    env.close()
    with pytest.raises(UnsafePickleError, match="bad.lmdb key 0: refusing"):
        list(read_lmdb(str(tmp_path / "bad.lmdb")))
    assert not target.exists()
    assert pickle.loads(payload) is None and target.exists()  # proof the payload was live


def test_malicious_tensor_storage_refused(tmp_path):
    """torch's own storage loader would unpickle anything; ours uses weights_only."""
    target = tmp_path / "pwned2"
    evil = _Evil()
    evil.target = str(target)
    buf = io.BytesIO()
    torch.save(evil, buf)

    payload = pickle.dumps(torch.zeros(2))
    # splice: a pickle that calls torch.storage._load_from_bytes on the evil torch.save bytes
    class _Splice:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (buf.getvalue(),))

    spliced = pickle.dumps(_Splice())
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global|exec"):
        restricted_loads(spliced, "y.lmdb key 0")
    assert not target.exists()
    assert restricted_loads(payload, "ok").shape == (2,)
