"""A small IS2RS/IS2RE-style set made with ASE's EMT standing in for DFT: rattled fcc(111) slabs with an
adatom, the two bottom layers fixed (OC20 tag 0), relaxed by ASE's LBFGS with EMT to give the targets."""
from __future__ import annotations

import numpy as np
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.optimize import LBFGS

from eqv2.relaxation.engine import Structure

METALS = ("Cu", "Pt", "Au", "Ni", "Ag", "Pd")
ADSORBATES = ("O", "C", "H", "N")


def initial_atoms(i: int, layers: int = 3, size: int = 2):
    """Structure i: a metal slab (rows of 2x2 atoms, `layers` deep) with an adatom, rattled with seed i."""
    slab = fcc111(METALS[i % len(METALS)], size=(size, size, layers), vacuum=6.0)
    add_adsorbate(slab, ADSORBATES[i % len(ADSORBATES)], 1.8, "fcc" if i % 2 else "ontop")
    layer = slab.get_tags()  # ASE: 1 = top layer ... layers = bottom; adsorbate 0
    tags = np.where(layer == 0, 2, np.where(layer == 1, 1, 0))
    slab.set_tags(tags)
    slab.set_constraint(FixAtoms(mask=tags == 0))
    rng = np.random.default_rng(i)
    free = tags > 0
    pos = slab.get_positions()
    pos[free] += rng.normal(0, 0.08, size=(free.sum(), 3))
    slab.set_positions(pos)
    slab.info["sid"] = str(1000 + i)
    return slab


def ase_relax(atoms, fmax: float, steps: int, maxstep=0.04, memory=50, damping=1.0, alpha=70.0):
    """(relaxed copy, optimizer steps taken) with ASE's LBFGS at OC20's settings, EMT forces."""
    atoms = atoms.copy()
    atoms.calc = EMT()
    opt = LBFGS(atoms, maxstep=maxstep, memory=memory, damping=damping, alpha=alpha, logfile=None)
    opt.run(fmax=fmax, steps=steps)
    return atoms, opt.nsteps


def structure_of(atoms, target=None) -> Structure:
    """An engine `Structure` of ASE atoms, with `target` (relaxed ASE atoms with EMT) as its reference."""
    calc = EMT()
    start = atoms.copy()
    start.calc = calc
    return Structure(sid=atoms.info["sid"], numbers=atoms.get_atomic_numbers(), positions=atoms.get_positions(),
                     cell=np.array(atoms.get_cell()), pbc=atoms.get_pbc(), fixed=atoms.get_tags() == 0,
                     tags=atoms.get_tags(), initial_energy=start.get_potential_energy(),
                     target_positions=None if target is None else target.get_positions(),
                     target_energy=None if target is None else target.get_potential_energy())


def write_is2r_lmdb(path, structures: list[Structure]) -> None:
    """An LMDB laid out as OC20's IS2RE/IS2RS downloads: torch_geometric Data records with pos, pos_relaxed,
    y_init, y_relaxed, cell [1,3,3], atomic_numbers (float), natoms, tags, fixed (float), sid (int)."""
    import pickle

    import lmdb
    import torch
    from torch_geometric.data import Data

    env = lmdb.open(str(path), subdir=False, map_size=1 << 30, meminit=False)
    with env.begin(write=True) as txn:
        for i, s in enumerate(structures):
            data = Data(pos=torch.tensor(s.positions, dtype=torch.float32),
                        pos_relaxed=torch.tensor(s.target_positions, dtype=torch.float32),
                        cell=torch.tensor(s.cell, dtype=torch.float32).view(1, 3, 3),
                        atomic_numbers=torch.tensor(s.numbers, dtype=torch.float32), natoms=len(s.numbers),
                        tags=torch.tensor(s.tags), fixed=torch.tensor(s.fixed, dtype=torch.float32),
                        y_init=float(s.initial_energy), y_relaxed=float(s.target_energy), sid=int(s.sid))
            txn.put(str(i).encode(), pickle.dumps(data, protocol=-1))
        txn.put(b"length", pickle.dumps(len(structures), protocol=-1))
    env.sync()
    env.close()


def write_is2r_extxyz(path, structures: list[Structure]) -> None:
    """The extxyz equivalent: initial frames with pos_relaxed arrays, y_init / y_relaxed / sid info, FixAtoms."""
    import ase.io
    from ase import Atoms

    frames = []
    for s in structures:
        atoms = Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc, tags=s.tags,
                      constraint=FixAtoms(mask=s.fixed))
        atoms.arrays["pos_relaxed"] = np.asarray(s.target_positions)
        atoms.info.update(sid=s.sid, y_init=s.initial_energy, y_relaxed=s.target_energy)
        frames.append(atoms)
    ase.io.write(str(path), frames, format="extxyz")
