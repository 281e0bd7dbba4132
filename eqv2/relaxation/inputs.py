"""Structures to relax, from OC20's IS2RE/IS2RS LMDBs as downloaded, eqv2 shards or any ASE-readable file.

IS2RE/IS2RS LMDB records (fairchem's `data.lmdb` of the is2re/is2rs tarballs) hold the initial
structure `pos`, the DFT-relaxed `pos_relaxed`, the energies `y_init` and `y_relaxed` (adsorption
energies, eV), `cell`, `atomic_numbers`, `tags`, `fixed` and `sid`; test LMDBs lack the relaxed
fields. They are read through eqv2's restricted unpickler (no pickled callable runs).
The extxyz equivalent: one frame per initial structure, the relaxed positions as the per-atom array
`pos_relaxed` and the energies as the info keys `y_relaxed` / `y_init` (the LMDB's names), the
id as info `sid` (else `<file name>:<frame>`); fixed atoms from a FixAtoms constraint (extxyz's
`move_mask`), else tag 0 where tags exist (OC20's convention: subsurface atoms are held).
eqv2 shards (manifest.json) give initial structures without targets (OC20's S2EF-style frames).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Iterator

import numpy as np

from eqv2.data.ase_source import fixed_atoms
from eqv2.data.format import SampleError
from eqv2.relaxation.engine import Structure


class InputError(ValueError):
    """A relaxation input is missing or malformed; the message names the file and record."""


def _fixed(fixed, tags, n: int) -> np.ndarray:
    if fixed is not None:
        return np.asarray(fixed, bool).reshape(n)
    if tags is not None:
        return np.asarray(tags).reshape(n) == 0
    return np.zeros(n, bool)


def _check(s: Structure, where: str) -> Structure:
    n = len(s.numbers)
    if n == 0:
        raise InputError(f"{where}: an empty structure")
    if s.positions.shape != (n, 3) or not np.all(np.isfinite(s.positions)):
        raise InputError(f"{where}: positions of shape {s.positions.shape} or not finite (want [{n}, 3])")
    if s.target_positions is not None and s.target_positions.shape != (n, 3):
        raise InputError(f"{where}: relaxed positions of shape {s.target_positions.shape}, want [{n}, 3]")
    if np.asarray(s.cell).shape != (3, 3):
        raise InputError(f"{where}: cell of shape {np.asarray(s.cell).shape}, want [3, 3]")
    return s


def read_is2r_lmdb(path: str | Path) -> Iterator[Structure]:
    """The records of one IS2RE/IS2RS LMDB file in key order."""
    import lmdb

    from eqv2.data.lmdb_source import _fields, restricted_loads

    def arr(value, dtype):
        if value is None:
            return None
        return np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value).astype(dtype)

    try:
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=True, meminit=False)
    except lmdb.Error as err:
        raise InputError(f"{path}: not a readable LMDB file ({err})") from err
    try:
        with env.begin() as txn:
            raw = txn.get(b"length")
            length = restricted_loads(raw, f"{path} key length") if raw is not None else env.stat()["entries"]
            for i in range(int(length)):
                where = f"{path} key {i}"
                value = txn.get(str(i).encode("ascii"))
                if value is None:
                    raise InputError(f"{where}: missing (length says {length})")
                try:
                    f = _fields(restricted_loads(value, where), where)
                except (SampleError, pickle.UnpicklingError) as err:
                    raise InputError(str(err)) from err
                if f.get("pos") is None or f.get("atomic_numbers") is None or f.get("cell") is None:
                    raise InputError(f"{where}: an IS2RE/IS2RS record needs pos, atomic_numbers and cell")
                numbers = arr(f["atomic_numbers"], np.float64).round().astype(np.int64).reshape(-1)
                n = len(numbers)
                energy = lambda k: None if f.get(k) is None else float(arr(f[k], np.float64).reshape(-1)[0])
                sid = f.get("sid")
                yield _check(Structure(
                    sid=str(int(arr(sid, np.int64).reshape(-1)[0])) if sid is not None else str(i),
                    numbers=numbers, positions=arr(f["pos"], np.float64).reshape(n, 3),
                    cell=arr(f["cell"], np.float64).reshape(3, 3), pbc=np.ones(3, bool),
                    fixed=_fixed(arr(f.get("fixed"), np.int64), arr(f.get("tags"), np.int64), n),
                    tags=arr(f.get("tags"), np.int64),
                    target_positions=None if f.get("pos_relaxed") is None else arr(f["pos_relaxed"], np.float64).reshape(n, 3),
                    target_energy=energy("y_relaxed"), initial_energy=energy("y_init")), where)
    finally:
        env.close()


def read_ase_file(path: str | Path) -> Iterator[Structure]:
    import ase.io

    path = Path(path)
    try:
        frames = ase.io.iread(str(path), index=":")
        for i, atoms in enumerate(frames):
            where = f"{path} frame {i}"
            n = len(atoms)
            tags = atoms.get_tags() if "tags" in atoms.arrays else None
            fixed = fixed_atoms(atoms) if atoms.constraints else None
            info = atoms.info
            target = atoms.arrays.get("pos_relaxed")
            yield _check(Structure(
                sid=str(info.get("sid", f"{path.name}:{i}")), numbers=atoms.get_atomic_numbers().astype(np.int64),
                positions=atoms.get_positions(), cell=np.array(atoms.get_cell()), pbc=atoms.get_pbc(),
                fixed=_fixed(fixed, tags, n), tags=tags,
                target_positions=None if target is None else np.asarray(target, np.float64),
                target_energy=float(info["y_relaxed"]) if "y_relaxed" in info else None,
                initial_energy=float(info["y_init"]) if "y_init" in info else None), where)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - ASE raises many types for unreadable files
        raise InputError(f"{path}: cannot read structures with ASE ({type(err).__name__}: {err})") from err


def read_shards(manifest: str | Path) -> Iterator[Structure]:
    from eqv2.data.reader import read_shard, resolve_shards

    urls, infos, _ = resolve_shards(str(manifest), "")
    for url, info in zip(urls, infos):
        samples, _ = read_shard(url, info, verify=True, on_error="raise", bounds=None)
        for s in samples:
            n = len(s["numbers"])
            yield Structure(sid=f"{s['sid']}_{s['fid']}", numbers=np.asarray(s["numbers"], np.int64),
                            positions=np.asarray(s["positions"], np.float64), cell=np.asarray(s["cell"], np.float64),
                            pbc=np.asarray(s["pbc"], bool), fixed=_fixed(s.get("fixed"), s.get("tags"), n),
                            tags=None if s.get("tags") is None else np.asarray(s["tags"], np.int64))


def read_inputs(paths: list[str]) -> Iterator[Structure]:
    """Structures of every input in order: a manifest.json (shards), an LMDB file or folder of *.lmdb,
    or an ASE-readable file."""
    for text in paths:
        path = Path(text)
        if not path.exists():
            raise InputError(f"input not found: {path}")
        if path.name == "manifest.json":
            yield from read_shards(path)
        elif path.is_dir():
            lmdbs = sorted(path.glob("*.lmdb"))
            if not lmdbs:
                raise InputError(f"{path}: a folder without *.lmdb files (give a manifest.json, LMDB or ASE file)")
            for f in lmdbs:
                yield from read_is2r_lmdb(f)
        elif path.suffix == ".lmdb":
            yield from read_is2r_lmdb(path)
        else:
            yield from read_ase_file(path)
