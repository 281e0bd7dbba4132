from __future__ import annotations

import pytest

from tests.relaxation.emt_set import ase_relax, initial_atoms, structure_of, write_is2r_extxyz

FMAX, STEPS = 0.02, 300


@pytest.fixture(scope="session")
def emt_set():
    """[(initial ASE atoms, EMT-relaxed ASE atoms, ASE's step count)] for 6 slabs with adatoms."""
    out = []
    for i in range(6):
        atoms = initial_atoms(i)
        relaxed, steps = ase_relax(atoms, FMAX, STEPS)
        out.append((atoms, relaxed, steps))
    return out


@pytest.fixture
def emt_structures(emt_set):
    return [structure_of(a, target=r) for a, r, _ in emt_set]


@pytest.fixture(scope="session")
def set_file(tmp_path_factory):
    """8 EMT structures with their EMT-relaxed targets as an IS2RS-style extxyz file."""
    path = tmp_path_factory.mktemp("set") / "set.extxyz"
    atoms = [initial_atoms(i) for i in range(8)]
    write_is2r_extxyz(path, [structure_of(a, target=ase_relax(a, 0.02, 300)[0]) for a in atoms])
    return path
