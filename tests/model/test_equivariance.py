"""Rotation equivariance of the whole model, in float64 over many random rotations.

The SO(2) convolutions, rotations, norms and gate activation are exactly equivariant; S2
activations are equivariant up to the sphere grid's sampling error, which vanishes as the grid is
refined.  So: exact (1e-9) with the gate activation or a fine grid, bounded and shrinking at the
published 18x18 grid.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from tests.model.equivariance import batch_from_atoms, max_equivariance_error, random_rotations

TINY = dict(num_layers=2, lmax=4, mmax=2, sphere_channels=12, attn_hidden_channels=12, attn_alpha_channels=6,
            attn_value_channels=3, ffn_hidden_channels=12, edge_channels=12, num_heads=2, max_radius=5.0,
            max_neighbors=1000)


def triclinic_crystal() -> Atoms:
    atoms = bulk("NaCl", "rocksalt", a=5.6) * (1, 1, 1)
    cell = np.array(atoms.cell) @ np.array([[1.0, 0.15, -0.1], [0.05, 0.95, 0.2], [0.1, -0.05, 1.1]])
    atoms.set_cell(cell, scale_atoms=True)
    atoms.rattle(0.1, seed=3)
    return atoms


def free_molecule() -> Atoms:
    m = molecule("CH3CH2OH")
    m.rattle(0.05, seed=1)
    return m


@pytest.fixture(scope="module")
def structures(oc20_atoms):
    return {"oc20": oc20_atoms, "triclinic": triclinic_crystal(), "molecule": free_molecule()}


def model(**overrides) -> EquiformerV2:
    torch.manual_seed(0)
    return EquiformerV2(ModelConfig(**{**TINY, **overrides})).double().eval()


@pytest.mark.parametrize(
    "name,norm",
    [("oc20", "layer_norm_sh"), ("triclinic", "layer_norm_sh"), ("molecule", "layer_norm_sh"),
     ("triclinic", "layer_norm"), ("triclinic", "rms_norm_sh")],
)
def test_exactly_equivariant_with_gate_activation(structures, name, norm):
    m = model(activation="gate", use_grid_mlp=False, norm_type=norm)
    err = max_equivariance_error(m, batch_from_atoms([structures[name]]), random_rotations(10, seed=7))
    assert err["energy"] < 1e-9 and err["forces"] < 1e-9, err


def test_separable_s2_is_exact_on_a_fine_grid(structures):
    m = model(grid_resolution=60, max_radius=4.0)
    batch = batch_from_atoms([structures["oc20"], structures["triclinic"]])
    err = max_equivariance_error(m, batch, random_rotations(6, seed=11))
    assert err["energy"] < 1e-9 and err["forces"] < 1e-9, err


def test_published_grid_error_is_small_and_shrinks_with_resolution(structures):
    batch = batch_from_atoms([structures["oc20"]])
    rotations = random_rotations(4, seed=5)
    errors = [max_equivariance_error(model(grid_resolution=r, max_radius=4.0), batch, rotations)["forces"]
              for r in (18, 30, 60)]
    assert errors[0] < 5e-3, errors  # the published 18x18 grid
    assert errors[0] > errors[1] > errors[2], errors


def test_higher_degree_lmax8_exactly_equivariant(structures):
    """Scaling L_max past the published 6: the same construction holds at L_max 8."""
    m = model(lmax=8, mmax=4, num_layers=1, activation="gate", use_grid_mlp=False, max_radius=4.0)
    err = max_equivariance_error(m, batch_from_atoms([structures["triclinic"]]), random_rotations(4, seed=13))
    assert err["energy"] < 1e-9 and err["forces"] < 1e-9, err
