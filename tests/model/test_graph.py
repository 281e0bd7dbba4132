"""Radius graph with periodic boundaries, against ASE's neighbour list."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111
from ase.neighborlist import neighbor_list

from eqv2.model.graph import radius_graph_pbc
from tests.model.equivariance import batch_from_atoms


def ase_edges(atoms: Atoms, cutoff: float) -> set[tuple]:
    i, j, shift = neighbor_list("ijS", atoms, cutoff)
    return {(int(a), int(b), *map(int, s)) for a, b, s in zip(i, j, shift)}


def our_edges(graph, offset=0) -> set[tuple]:
    src, tgt = graph.edge_index
    return {(int(t) - offset, int(s) - offset, *map(int, o)) for s, t, o in zip(src, tgt, graph.cell_offset)}


def small_triclinic() -> Atoms:
    # a cell much smaller than the cutoff in every direction: images far beyond +-1 are needed
    atoms = Atoms("CuO", positions=[[0, 0, 0], [1.1, 0.7, 0.4]],
                  cell=[[2.4, 0.0, 0.0], [0.9, 2.2, 0.0], [0.5, -0.6, 2.6]], pbc=True)
    return atoms


@pytest.mark.parametrize("make,cutoff", [
    (small_triclinic, 6.0),
    (lambda: bulk("Cu", "fcc", a=3.6, cubic=True), 5.0),
    (lambda: fcc111("Pt", size=(2, 2, 3), vacuum=6.0), 7.0),  # pbc T T F slab
])
def test_all_neighbours_within_radius_match_ase(make, cutoff):
    atoms = make()
    atoms.rattle(0.02, seed=0)
    b = batch_from_atoms([atoms])
    g = radius_graph_pbc(b.pos, b.cell, b.pbc, b.natoms, cutoff, max_neighbors=10**6)
    assert our_edges(g) == ase_edges(atoms, cutoff)
    # edge vectors point from the target to the source image
    src, tgt = g.edge_index
    expect = b.pos[src] + g.cell_offset.to(b.pos.dtype) @ b.cell[0] - b.pos[tgt]
    assert torch.allclose(g.edge_vec, expect, atol=1e-10)
    assert torch.all(g.distance <= cutoff)


def test_batched_structures_match_separate_ones():
    structures = [small_triclinic(), fcc111("Cu", size=(2, 2, 2), vacuum=5.0)]
    b = batch_from_atoms(structures)
    g = radius_graph_pbc(b.pos, b.cell, b.pbc, b.natoms, 5.0, 10**6)
    offset = 0
    for atoms in structures:
        mask = (g.edge_index[1] >= offset) & (g.edge_index[1] < offset + len(atoms))
        sub = type(g)(g.edge_index[:, mask], g.edge_vec[mask], g.distance[mask], g.cell_offset[mask])
        assert our_edges(sub, offset) == ase_edges(atoms, 5.0)
        offset += len(atoms)


def test_max_neighbors_is_strict_and_keeps_the_nearest(oc20_atoms):
    b = batch_from_atoms([oc20_atoms])
    full = radius_graph_pbc(b.pos, b.cell, b.pbc, b.natoms, 12.0, 10**6)
    cut = radius_graph_pbc(b.pos, b.cell, b.pbc, b.natoms, 12.0, 20)
    counts = torch.bincount(cut.edge_index[1], minlength=len(oc20_atoms))
    assert torch.all(counts == 20)
    for i in range(len(oc20_atoms)):
        kept = cut.distance[cut.edge_index[1] == i]
        all_d = torch.sort(full.distance[full.edge_index[1] == i]).values
        assert torch.allclose(torch.sort(kept).values, all_d[:20])
    assert torch.all(cut.edge_index[1][1:] >= cut.edge_index[1][:-1])  # receiver-sorted


def test_non_periodic_structure_has_no_images():
    atoms = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    b = batch_from_atoms([atoms])
    g = radius_graph_pbc(b.pos, b.cell, b.pbc, b.natoms, 5.0, 20)
    assert g.edge_index.shape[1] == 6 and torch.all(g.cell_offset == 0)
