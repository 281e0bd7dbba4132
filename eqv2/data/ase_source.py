"""Any ASE-readable dataset (extxyz, ASE db, traj, ...) as eqv2 samples: a user's own DFT data.

Each frame becomes one sample: positions, numbers, cell, pbc; energy and forces from the frame's
calculator results (what ASE attaches when it reads energies and forces from extxyz, db or traj) or
from `info` / `arrays` keys the user names; stress when present; OC20-style tags (`arrays["tags"]`) when
asked for, and fixed atoms (FixAtoms constraints) when present. No OC20 txt files are needed.

Sample ids: `sid` = the frame's system (an `info` key the user names, or else the file, as its path
below the input root with `/` → `-`), `fid` = the frame's index in its file. A frame is put in the
validation split by a hash of its system id (`split_by="system"`: all frames of one system land on
the same side, no leakage) or of its sample id (`split_by="structure"`), so the split does not depend
on the order of files or on the number of reader processes.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from eqv2.data.format import SampleError

SUFFIXES = (".extxyz", ".xyz", ".traj", ".db", ".json", ".xyz.gz", ".extxyz.gz")
_UNSAFE = re.compile(r"[^A-Za-z0-9-]+")


@dataclass(frozen=True)
class AseKeys:
    """Where a frame's labels are: "calc" = the calculator results ASE read with the frame; any other
    string = an `info` key (energy) or an `arrays` key (forces) or an `info` key (stress, 3x3 or Voigt 6);
    stress None = not read."""

    energy: str = "calc"
    forces: str = "calc"
    stress: str | None = "calc"
    system: str | None = None  # info key naming the system; None = the file
    tags: bool = False  # read arrays["tags"] as OC20's 0 subsurface / 1 surface / 2 adsorbate (ASE's own
    # builders tag layers 1, 2, 3, ...: not OC20's meaning, so tags are only read when asked for)


@dataclass(frozen=True)
class Split:
    """Which frames one output keeps: the validation side holds a `val_fraction` of the hashed ids."""

    side: Literal["all", "train", "val"] = "all"
    val_fraction: float = 0.0
    split_by: Literal["system", "structure"] = "system"
    seed: int = 0

    def keeps(self, system: str, key: str) -> bool:
        if self.side == "all":
            return True
        text = f"{self.seed}:{system if self.split_by == 'system' else key}".encode()
        u = int.from_bytes(hashlib.sha256(text).digest()[:8], "little") / 2**64
        return (u < self.val_fraction) == (self.side == "val")


def find_ase_inputs(paths: list[str]) -> tuple[list[str], Path]:
    """Sorted input files (files given, or those with a known suffix below a directory) and their root."""
    files: list[Path] = []
    roots = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
            if not found:
                raise FileNotFoundError(f"{p}: no files ending in {', '.join(SUFFIXES)}")
            files += found
            roots.append(p)
        elif p.is_file():
            files.append(p)
            roots.append(p.parent)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    return [str(f) for f in files], Path(os.path.commonpath([str(r.resolve()) for r in roots]))


def system_of_file(path: str, root: Path) -> str:
    p = Path(path).resolve()
    try:
        rel = p.relative_to(root.resolve())
    except ValueError:
        rel = Path(*p.parts[1:])
    name = str(rel)
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _UNSAFE.sub("-", name).strip("-") or "frames"


def _label(atoms, key: str, kind: str, where: str, required: bool):
    if key == "calc":
        results = getattr(atoms.calc, "results", None) or {}
        value = results.get(kind)
        if value is None and kind == "energy":
            value = results.get("free_energy")
    elif kind == "forces":
        value = atoms.arrays.get(key)
    else:
        value = atoms.info.get(key)
    if value is None and required:
        source = "its calculator results" if key == "calc" else f"key '{key}'"
        raise SampleError(f"{where}: no {kind} ({source} has none; name where it is with --{kind}-key)")
    return value


def _stress_matrix(value, where: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape == (6,):  # ASE's Voigt order: xx yy zz yz xz xy
        xx, yy, zz, yz, xz, xy = arr
        arr = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    if arr.shape != (3, 3):
        raise SampleError(f"{where}: stress has shape {arr.shape}, expected (6,) or (3, 3)")
    return arr


def _frames(source: str):
    """ASE's frames of a file; for an ASE db each row's key-value pairs and data join `atoms.info` (ASE's
    own reader leaves them out), so --energy-key / --system-key can name them."""
    import ase.io

    if not source.endswith(".db"):
        yield from ase.io.iread(source, index=":")
        return
    from ase.db import connect

    with connect(source, serial=True) as db:
        for row in db.select():
            atoms = row.toatoms(add_additional_information=True)
            extra = atoms.info.pop("key_value_pairs", {}) or {}
            data = atoms.info.pop("data", {}) or {}
            atoms.info.update({**data, **extra})
            for key, value in data.items():  # per-atom arrays stored as data (e.g. forces under a key)
                if np.ndim(value) == 2 and np.shape(value)[0] == len(atoms):
                    atoms.arrays.setdefault(key, np.asarray(value))
            yield atoms


def fixed_atoms(atoms) -> np.ndarray:
    """[N] bool: True for the atoms an ASE FixAtoms constraint holds (other constraints do not count)."""
    fixed = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if type(constraint).__name__ == "FixAtoms":
            fixed[constraint.get_indices()] = True
    return fixed


def _sample(atoms, index: int, file_system: str, keys: AseKeys, where: str) -> dict:
    system = file_system
    if keys.system is not None:
        if keys.system not in atoms.info:
            raise SampleError(f"{where}: no info key '{keys.system}' (--system-key)")
        system = _UNSAFE.sub("-", str(atoms.info[keys.system])).strip("-") or "system"
    sample = {"sid": system, "fid": str(index), "positions": atoms.get_positions(),
              "numbers": atoms.get_atomic_numbers(), "cell": np.array(atoms.get_cell()), "pbc": atoms.get_pbc()}
    # a key the user named must be there; labels from the calculator may be absent (then the sharder's
    # check_labels refuses the frame, unless --unlabelled shards a split for predictions only)
    energy = _label(atoms, keys.energy, "energy", where, keys.energy != "calc")
    forces = _label(atoms, keys.forces, "forces", where, keys.forces != "calc")
    if energy is not None:
        sample["energy"] = sample["total_energy"] = float(energy)
    if forces is not None:
        sample["forces"] = np.asarray(forces, dtype=np.float64)
    if keys.stress is not None:
        stress = _label(atoms, keys.stress, "stress", where, keys.stress != "calc")
        if stress is not None:
            sample["stress"] = _stress_matrix(stress, where)
    if keys.tags and "tags" in atoms.arrays:
        sample["tags"] = atoms.arrays["tags"]
    if atoms.constraints:
        sample["fixed"] = fixed_atoms(atoms)
    return sample


def read_ase(source: str, root: str, keys: AseKeys, split: Split) -> Iterator[tuple[str, "dict | SampleError"]]:
    """(where, sample) for the frames of one ASE-readable file that `split` keeps, in frame order; a bad
    frame is (where, SampleError) (the sharding driver raises it or counts a skip), and a file that
    cannot be read further ends with one."""
    file_system = system_of_file(source, Path(root))
    index = 0
    try:
        for index, atoms in enumerate(_frames(source)):
            where = f"{source} frame {index}"
            try:
                sample = _sample(atoms, index, file_system, keys, where)
            except SampleError as err:
                yield where, err
                continue
            if split.keeps(sample["sid"], f"{sample['sid']}_{index}"):
                yield where, sample
    except (ValueError, KeyError, IndexError, StopIteration, OSError, AttributeError) as err:
        where = f"{source} frame {index}"
        yield where, SampleError(f"{where}: cannot read it as an ASE file ({type(err).__name__}: {err})")
