"""Checks every structure passes before it is written to a shard, and again when a shard is read.

    validate_frame(sample, where) -> int     structure: fields, shapes, finite values, atomic numbers,
                                             no two atoms (or an atom and a periodic image) closer than 0.01 Å
    check_labels(sample, where, bounds)      targets: energy and forces present, finite, within bounds
    atomic_numbers(symbols, where)           element symbols -> atomic numbers, naming an unknown symbol

Each raises `SampleError` whose message starts with `where` (e.g. "data_003.extxyz frame 17") and says
what is wrong, so a sharding tool prints one line and the training stream names shard and sample.

Label bounds are generous sanity limits, not physics: DFT total energies are a few eV per atom and
OC20 forces rarely exceed 50 eV/Å, while the damage they guard against is orders of magnitude beyond
(an energy of 1e30 that moves the normalisers to 1e28, a force with a flipped exponent byte).  Data
with larger legitimate values (e.g. all-electron total energies) raises them: `--max-energy-per-atom`
and `--max-force` when sharding, `data.max_energy_per_atom` / `data.max_force` when training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from ase.data import chemical_symbols

from eqv2.data.format import SampleError, check_sample

MIN_DISTANCE = 0.01  # Å: closer atoms are a duplicated atom, not a structure (the radius graph refuses them too)
_Z = {symbol: z for z, symbol in enumerate(chemical_symbols) if z > 0}


@dataclass(frozen=True)
class LabelBounds:
    max_energy_per_atom: float = 100.0  # eV: |energy| / atoms above this is refused
    max_force: float = 100.0  # eV/Å: any |force component| above this is refused
    require: bool = True  # energy and forces must both be present (no energy-only samples)

    def __post_init__(self) -> None:
        for name in ("max_energy_per_atom", "max_force"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def atomic_numbers(symbols, where: str) -> np.ndarray:
    """Atomic numbers of element symbols (uint8); an unknown symbol is a SampleError naming it and its atom."""
    try:
        return np.fromiter((_Z[s] for s in symbols), dtype=np.uint8, count=len(symbols))
    except KeyError as err:
        atom = list(symbols).index(err.args[0])
        raise SampleError(f"{where}: unknown element symbol {err.args[0]!r} (atom {atom})") from None


def validate_frame(sample: dict, where: str, min_distance: float = MIN_DISTANCE) -> int:
    """Structure checks (see module docstring); returns the atom count."""
    n = check_sample(sample, where)  # fields, shapes, NaN/inf, atomic numbers 1..118, tags
    pair = coincident_pair(sample["positions"], sample["cell"], sample["pbc"], min_distance)
    if pair is not None:
        i, j, d = pair
        raise SampleError(f"{where}: atoms {i} and {j} coincide (distance {d:.2e} Å < {min_distance} Å, "
                          f"periodic images included)")
    return n


def check_labels(sample: dict, where: str, bounds: LabelBounds) -> None:
    """Energy and forces present (if `bounds.require`), finite and within `bounds`."""
    energy, forces = sample.get("energy"), sample.get("forces")
    if bounds.require:
        missing = [name for name, v in (("energy", energy), ("forces", forces)) if v is None]
        if missing:
            raise SampleError(f"{where}: no {' and no '.join(missing)} (eqv2 trains on energies and forces; "
                              f"every sample needs both)")
    n = len(sample["numbers"])
    for name in ("energy", "total_energy"):
        value = sample.get(name)
        if value is None:
            continue
        e = float(np.asarray(value))
        if not math.isfinite(e):
            raise SampleError(f"{where}: {name} is {e}")
        if abs(e) / n > bounds.max_energy_per_atom:
            raise SampleError(f"{where}: |{name}| per atom is {abs(e) / n:.4g} eV ({name} {e:.6g} eV, {n} atoms), "
                              f"above the bound of {bounds.max_energy_per_atom:g} eV{_hint('max_energy_per_atom')}")
    if forces is not None:
        f = np.abs(np.asarray(forces, dtype=np.float64))
        if not np.all(np.isfinite(f)):
            raise SampleError(f"{where}: forces contain NaN or inf")
        if f.size and f.max() > bounds.max_force:
            atom = int(np.argmax(f.max(axis=1)))
            raise SampleError(f"{where}: force component {f.max():.4g} eV/Å on atom {atom}, above the bound "
                              f"{bounds.max_force:g} eV/Å{_hint('max_force')}")


_SUBSETS = np.array([[(m >> k) & 1 for k in range(3)] for m in range(1, 8)], dtype=np.float64)  # [7, 3]
_DIRECTION = np.array([0.5773502691896258, 0.6172133998483676, 0.5345224838248488])  # along no lattice row


def _hint(name: str) -> str:
    return f" (if real, raise --{name.replace('_', '-')} when sharding, data.{name} when training)"


def coincident_pair(positions, cell, pbc, min_distance: float = MIN_DISTANCE) -> tuple[int, int, float] | None:
    """(i, j, distance) of a pair of atoms closer than `min_distance`, periodic images included; else None.

    O(N log N): positions are wrapped into the cell along periodic axes, atoms within `min_distance` of
    a cell face get the images that bring them next to the opposite face, and all points are sorted by
    their projection on a direction no lattice row lies along; only points whose projections differ by
    less than `min_distance` (a handful) have their full distance computed.
    """
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    periodic = np.asarray(pbc, dtype=bool).reshape(3)
    origin = np.arange(len(pos))
    points = pos
    if periodic.any() and abs(np.linalg.det(cell)) > 1e-12:
        inverse = np.linalg.inv(cell)
        frac = pos @ inverse  # pos = frac @ cell
        frac[:, periodic] %= 1.0
        # distance between opposite faces of the cell along each axis: 1 / |column k of the inverse|
        eps = min_distance * np.sqrt((inverse * inverse).sum(axis=0))
        shift = ((frac < eps).astype(np.float64) - (frac > 1.0 - eps)) * periodic  # +1: image past the far face
        near = np.flatnonzero(shift.any(axis=1))
        if len(near):  # images over every non-empty subset of the faces an atom is near
            s = shift[near][:, None, :] * _SUBSETS  # [M, 7, 3]
            ok = ~np.any(_SUBSETS.astype(bool) & (shift[near][:, None, :] == 0), axis=2)  # [M, 7]
            frac = np.concatenate([frac, (frac[near][:, None, :] + s)[ok]])
            origin = np.concatenate([origin, np.repeat(near, ok.sum(axis=1))])
        points = frac @ cell
    proj = points @ _DIRECTION
    order = np.argsort(proj, kind="stable")
    proj, points, origin = proj[order], points[order], origin[order]
    counts = np.searchsorted(proj, proj + min_distance, side="left") - np.arange(len(proj)) - 1
    total = int(counts.sum())
    if total == 0:
        return None
    a = np.repeat(np.arange(len(proj)), counts)
    b = a + 1 + np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    d = np.sqrt(((points[a] - points[b]) ** 2).sum(axis=1))
    close = (d < min_distance) & (origin[a] != origin[b])
    if not close.any():
        return None
    k = int(np.argmax(close))
    i, j = sorted((int(origin[a[k]]), int(origin[b[k]])))
    return i, j, float(d[k])
