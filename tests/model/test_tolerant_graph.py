"""Degeneracy-tolerant neighbour selection (`enforce_max_neighbors_strictly: false`): the graph, and so
the model, is invariant to rotations and to the order of the atoms; strict selection, which cuts shells
of equidistant neighbours by candidate order, is not.

Ideal lattices with the cap inside a shell of equidistant neighbours (fcc(111): 12 nearest, cap 10)
make atoms' choices ties; the tests check that strict selection does change with the atom order (and,
in float32, with the orientation) there, so that the tolerant mode's invariance is not that of an easy
structure.  Wurtzite: a crystal periodic in 3D whose forces do not vanish by symmetry.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from ase.build import bulk, fcc111

from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from eqv2.model.graph import radius_graph_pbc
from tests.model.equivariance import batch_from_atoms, max_equivariance_error, random_rotations, rotate_batch

MAX_RADIUS = 5.0
TINY = dict(num_layers=2, lmax=3, mmax=2, sphere_channels=8, attn_hidden_channels=8, attn_alpha_channels=4,
            attn_value_channels=2, ffn_hidden_channels=8, edge_channels=8, num_heads=2, alpha_drop=0.0,
            drop_path_rate=0.0, activation="gate", use_grid_mlp=False, max_radius=MAX_RADIUS)  # gate: exact
IDS = ["Pt111_slab", "ZnO_wurtzite"]


def ideal_structure(index: int):
    """(atoms, max_neighbors): the cap falls inside a shell of equidistant neighbours."""
    if index == 0:
        return fcc111("Pt", size=(2, 2, 3), vacuum=6.0), 10  # periodic in x, y
    return bulk("ZnO", "wurtzite", a=3.25, c=5.21, u=0.38) * (2, 1, 1), 12  # periodic in 3D


def edges(batch, cap: int, strict: bool, perm: torch.Tensor | None = None) -> set[tuple]:
    """{(target, source, image)} of the batch's graph; atoms renamed by perm[new] = old when given."""
    g = radius_graph_pbc(batch.pos, batch.cell, batch.pbc, batch.natoms, MAX_RADIUS, cap, strict=strict)
    name = perm if perm is not None else torch.arange(batch.pos.shape[0])
    return {(int(name[t]), int(name[s]), *o.tolist()) for s, t, o in zip(*g.edge_index, g.cell_offset)}


def permuted(batch, perm: torch.Tensor):
    """The batch (one structure) with its atoms in the order perm (new atom a is old atom perm[a])."""
    return replace(batch, pos=batch.pos[perm], atomic_numbers=batch.atomic_numbers[perm])


def model(cap: int, strict: bool) -> EquiformerV2:
    torch.manual_seed(0)
    return EquiformerV2(ModelConfig(**TINY, max_neighbors=cap, enforce_max_neighbors_strictly=strict)).double().eval()


@pytest.mark.parametrize("index", [0, 1], ids=IDS)
def test_tolerant_graph_keeps_whole_shells_and_ignores_atom_order(index):
    atoms, cap = ideal_structure(index)
    batch = batch_from_atoms([atoms], torch.float32)
    tolerant = edges(batch, cap, strict=False)
    degree = torch.bincount(torch.tensor([t for t, *_ in tolerant]), minlength=len(atoms))
    assert int(degree.min()) > cap  # the shell at the cap is kept whole
    gen = torch.Generator().manual_seed(index)
    strict_changed = 0
    for _ in range(8):
        perm = torch.randperm(len(atoms), generator=gen)
        assert edges(permuted(batch, perm), cap, strict=False, perm=perm) == tolerant
        strict_changed += edges(permuted(batch, perm), cap, strict=True, perm=perm) != edges(batch, cap, strict=True)
    assert strict_changed > 0  # strict selection does depend on the atom order here


@pytest.mark.parametrize("index", [0, 1], ids=IDS)
def test_tolerant_graph_ignores_the_orientation_in_float32(index):
    """float32 round-off differs between orientations, and breaks strict selection's ties differently;
    the tolerance (0.01 Å^2) is far above it."""
    atoms, cap = ideal_structure(index)
    batch = batch_from_atoms([atoms], torch.float32)
    tolerant, strict = edges(batch, cap, strict=False), edges(batch, cap, strict=True)
    strict_changed = 0
    for rot in random_rotations(24, seed=index):
        rotated = rotate_batch(batch, rot)
        assert edges(rotated, cap, strict=False) == tolerant
        strict_changed += edges(rotated, cap, strict=True) != strict
    assert strict_changed > 0


@pytest.mark.parametrize("index", [0, 1], ids=IDS)
def test_tolerant_model_is_invariant_to_rotations(index):
    """float64, many random rotations: energy invariant, forces rotate with the structure (1e-9)."""
    atoms, cap = ideal_structure(index)
    batch = batch_from_atoms([atoms], torch.float64)
    err = max_equivariance_error(model(cap, strict=False), batch, random_rotations(32, seed=10 + index))
    assert err["energy"] < 1e-9 and err["forces"] < 1e-9, err


@pytest.mark.parametrize("index", [0, 1], ids=IDS)
def test_tolerant_model_is_invariant_to_atom_order(index):
    """float64: the same energy and the same (permuted) forces for any order of the atoms; strict
    selection's energy changes with the order on these ideal lattices."""
    atoms, cap = ideal_structure(index)
    batch = batch_from_atoms([atoms], torch.float64)
    tolerant, strict = model(cap, strict=False), model(cap, strict=True)
    with torch.no_grad():
        ref, ref_strict = tolerant(batch), strict(batch)
        gen = torch.Generator().manual_seed(20 + index)
        strict_spread = 0.0
        for _ in range(6):
            perm = torch.randperm(len(atoms), generator=gen)
            out = tolerant(permuted(batch, perm))
            torch.testing.assert_close(out["energy"], ref["energy"], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(out["forces"], ref["forces"][perm], rtol=1e-9, atol=1e-11)
            strict_spread = max(strict_spread, float((strict(permuted(batch, perm))["energy"] - ref_strict["energy"]).abs()))
    assert strict_spread > 1e-9 * float(ref_strict["energy"].abs().clamp_min(1.0))  # far above round-off
