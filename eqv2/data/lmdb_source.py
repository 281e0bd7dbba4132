"""fairchem/OCP S2EF LMDB folders (`data.NNNN.lmdb`) read safely.

Each LMDB holds ascii integer keys "0".."n-1" whose values are pickled torch_geometric `Data`
records, plus a `length` key.  Unpickling runs whatever callables a pickle names, so records are
read with `RestrictedUnpickler`: it resolves only the handful of globals such records contain and
maps the PyG classes to inert placeholders (we never need PyG behaviour, only the stored fields).
Any other global is refused with `UnsafePickleError` naming the LMDB, key, module and name, before
anything is called.  Tensor storages inside the pickle are loaded with `torch.load(weights_only=True)`
(torch's own `_load_from_bytes` would allow arbitrary pickles).

Both record eras are handled: PyG >= 2 keeps fields in `_store` (a GlobalStorage with `_mapping`),
PyG 1 kept them in the object's `__dict__`.  Energy is `y` (older) or `energy`; forces `force` or
`forces`.  OC20 LMDBs carry no pbc: periodic in all three directions is assumed, as fairchem does.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from eqv2.data.format import SampleError, check_sample


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global outside the allow-list; nothing from it was executed."""


class _Record:
    """Inert stand-in for torch_geometric Data / GlobalStorage: keeps the pickled state, nothing else."""

    def __setstate__(self, state) -> None:
        self.state = state


class _Marker:
    """Stand-in for PyG's attribute helper classes referenced (not instantiated) in Data state."""


def _load_storage(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


_ALLOWED = {
    ("torch_geometric.data.data", "Data"): _Record,
    ("torch_geometric.data.storage", "GlobalStorage"): _Record,
    ("torch_geometric.data.data", "DataEdgeAttr"): _Marker,
    ("torch_geometric.data.data", "DataTensorAttr"): _Marker,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("torch", "Size"): torch.Size,
    ("_codecs", "encode"): __import__("codecs").encode,  # how protocol-2 pickles spell bytes objects
}


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, where: str) -> None:
        super().__init__(io.BytesIO(data))
        self.where = where

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.where}: refusing to unpickle global {module}.{name}: only torch_geometric Data records "
                f"with tensors are admitted (a pickle that names other callables could run code)"
            ) from None


def restricted_loads(data: bytes, where: str):
    return RestrictedUnpickler(data, where).load()


def _fields(obj, where: str) -> dict:
    if not isinstance(obj, _Record) or not isinstance(obj.state, dict):
        raise SampleError(f"{where}: not a torch_geometric Data record ({type(obj).__name__})")
    state = obj.state
    store = state.get("_store")
    if isinstance(store, _Record):  # PyG >= 2
        mapping = store.state.get("_mapping") if isinstance(store.state, dict) else None
        if not isinstance(mapping, dict):
            raise SampleError(f"{where}: Data._store without a field mapping")
        return mapping
    return state  # PyG 1: fields live in __dict__


def _array(value, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value).astype(dtype, copy=False)


def _scalar_text(value) -> str:
    return str(int(value.item() if isinstance(value, torch.Tensor) else value))


def record_to_sample(data: bytes, where: str, index: int) -> dict:
    f = _fields(restricted_loads(data, where), where)
    pick = lambda *names: next((f[n] for n in names if f.get(n) is not None), None)
    pos = pick("pos")
    numbers = pick("atomic_numbers")
    if pos is None or numbers is None:
        raise SampleError(f"{where}: record lacks {'pos' if pos is None else 'atomic_numbers'}")
    energy = pick("y", "energy")
    forces = pick("force", "forces")
    fixed = pick("fixed")
    tags = pick("tags")
    cell = pick("cell")
    sample = {
        "sid": _scalar_text(f["sid"]) if f.get("sid") is not None else str(index),
        "fid": _scalar_text(f["fid"]) if f.get("fid") is not None else "0",
        "positions": _array(pos, np.float32),
        "numbers": _array(numbers, np.float64).round().astype(np.uint8),
        "cell": _array(cell, np.float32).reshape(3, 3) if cell is not None else None,
        "pbc": np.ones(3, bool),
        "tags": _array(tags, np.int64).astype(np.int8) if tags is not None else None,
        "fixed": _array(fixed, np.int64).astype(bool) if fixed is not None else None,
        "forces": _array(forces, np.float32) if forces is not None else None,
        "energy": float(_array(energy, np.float64).reshape(-1)[0]) if energy is not None else None,
    }
    if sample["cell"] is None:
        raise SampleError(f"{where}: record lacks cell")
    check_sample(sample, where)
    return sample


def find_lmdbs(root: str | Path) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    files = sorted(root.glob("*.lmdb"))
    if not files:
        raise FileNotFoundError(f"{root}: no *.lmdb files")
    return files


def read_lmdb(source: str) -> Iterator[tuple[str, dict | SampleError]]:
    """(where, sample) for each record of one LMDB file in key order 0..length-1; a malformed record
    comes as (where, SampleError) for the caller to raise or skip.  `where` is "<file> key <i>"."""
    import lmdb

    env = lmdb.open(str(source), subdir=False, readonly=True, lock=False, readahead=True, meminit=False)
    try:
        with env.begin() as txn:
            raw_len = txn.get(b"length")
            if raw_len is not None:
                length = restricted_loads(raw_len, f"{source} key length")
                if not isinstance(length, int):
                    raise SampleError(f"{source}: 'length' key is not an integer")
            else:
                length = env.stat()["entries"]
            for i in range(length):
                value = txn.get(str(i).encode("ascii"))
                where = f"{source} key {i}"
                if value is None:
                    yield where, SampleError(f"{where}: missing (length says {length})")
                    continue
                try:
                    yield where, record_to_sample(value, where, i)
                except SampleError as err:
                    yield where, err
                except (TypeError, KeyError, IndexError, RuntimeError) as err:  # a record of unexpected layout
                    yield where, SampleError(f"{where}: unreadable record: {type(err).__name__}: {err}")
    finally:
        env.close()


def write_lmdb(path: str | Path, samples: list[dict], energy_key: str = "y", force_key: str = "force") -> None:
    """An OCP-style S2EF LMDB of real torch_geometric Data records (for tests and benchmarks)."""
    import lmdb
    from torch_geometric.data import Data

    env = lmdb.open(str(path), subdir=False, map_size=1 << 34, meminit=False)
    with env.begin(write=True) as txn:
        for i, s in enumerate(samples):
            n = len(s["numbers"])
            data = Data(
                pos=torch.as_tensor(np.asarray(s["positions"], np.float32)),
                cell=torch.as_tensor(np.asarray(s["cell"], np.float32)).view(1, 3, 3),
                atomic_numbers=torch.as_tensor(np.asarray(s["numbers"], np.float32)),
                natoms=n,
                tags=torch.as_tensor(np.asarray(s["tags"], np.int64)),
                fixed=torch.as_tensor(np.asarray(s["fixed"], np.float32)),
                sid=int(s["sid"]),
                fid=torch.tensor(int(s["fid"])),
                **{energy_key: float(s["energy"]), force_key: torch.as_tensor(np.asarray(s["forces"], np.float32))},
            )
            txn.put(str(i).encode("ascii"), pickle.dumps(data, protocol=-1))
        txn.put(b"length", pickle.dumps(len(samples), protocol=-1))
    env.sync()
    env.close()
