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


def _brute_force(pos, cell, reps, cutoff):
    """Every (target, source, image) with |pos_i - (pos_j + n.cell)|^2 <= cutoff^2, forming each vector
    in full in the reference's arithmetic (image vectors by one product cell^T @ n, squares summed x, y,
    z in turn): the definition the neighbour search's candidate filter must reproduce exactly.  Also
    returns every squared distance [i, j, S] and the images [S, 3]."""
    rng = [torch.arange(-k, k + 1) for k in reps]
    shifts = torch.cartesian_prod(*rng).reshape(-1, 3)
    image = torch.bmm(cell.T[None], shifts.T.to(pos.dtype)[None])[0].T  # [S, 3]
    vec = pos[:, None, None, :] - (pos[None, :, None, :] + image[None, None])  # [i, j, S, 3]
    dist_sq = (vec[..., 0] * vec[..., 0] + vec[..., 1] * vec[..., 1]) + vec[..., 2] * vec[..., 2]
    keep = dist_sq <= cutoff * cutoff
    n = pos.shape[0]
    keep[torch.arange(n), torch.arange(n), (shifts == 0).all(1).nonzero()[0, 0]] = False
    return {(int(i), int(j), *shifts[s].tolist()) for i, j, s in keep.nonzero().tolist()}, dist_sq, shifts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_neighbours_exactly_at_the_cutoff_are_found_like_the_definition(dtype):
    """The cutoff put exactly on the distance of one pair, 40 times: that pair sits on the boundary,
    where the fast candidate filter (an expansion of |b + L|^2, which cancels digits) is least
    accurate; the edges must be those of the definition, in float32 and float64."""
    atoms = small_triclinic() * (2, 1, 1)
    atoms.rattle(0.05, seed=1)
    b = batch_from_atoms([atoms], dtype)
    reps = [6, 6, 6]  # beyond what any cutoff below needs
    _, dist_sq, _ = _brute_force(b.pos, b.cell[0], reps, 0.0)
    candidates = dist_sq[(dist_sq > 1.0) & (dist_sq < 49.0)]
    picks = candidates[torch.randperm(candidates.shape[0], generator=torch.Generator().manual_seed(0))[:40]]
    for d_sq in picks.tolist():
        cutoff = d_sq**0.5  # squared again (rounded to the dtype) it is that pair's squared distance
        g = radius_graph_pbc(b.pos, b.cell, b.pbc, b.natoms, cutoff, 10**6)
        expected, _, _ = _brute_force(b.pos, b.cell[0], reps, cutoff)
        assert our_edges(g) == expected, cutoff


def test_neighbour_order_is_by_target_then_distance_then_candidate():
    """Kept edges are ordered by one stable sort of an integer key (target, float32 distance bits): the
    same permutation as stable sorts by distance then target, also among exactly tied distances."""
    from eqv2.model.graph import _select_neighbors

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 1)
    b = batch_from_atoms([atoms], torch.float32)
    g = radius_graph_pbc(b.pos, b.cell, b.pbc, b.natoms, 8.0, 10**6)
    shuffle = torch.randperm(g.distance.shape[0], generator=torch.Generator().manual_seed(0))
    tgt, dist = g.edge_index[1][shuffle], g.distance[shuffle]
    ties = (torch.unique(torch.stack([tgt.float(), dist]), dim=1, return_counts=True)[1] > 1).sum()
    assert ties > 100  # the lattice's symmetric neighbours: many exact ties
    two_sorts = torch.sort(dist, stable=True).indices
    two_sorts = two_sorts[torch.sort(tgt[two_sorts], stable=True).indices]
    assert torch.equal(_select_neighbors(tgt, dist, len(atoms), 10**6, strict=True), two_sorts)
