"""The rank-2 stress head (eqv2/model/rank2_head.py): the tensor basis, shape buckets, mean energies."""
from __future__ import annotations

import math

import pytest
import torch
from ase.build import bulk

from eqv2.execution import ExecutionPlan, apply_plan
from eqv2.model.config import ModelConfig, Rank2HeadConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from eqv2.model.rank2_head import _anisotropic_basis, symmetric_tensor
from tests.model.equivariance import batch_from_atoms

TINY = dict(num_layers=1, lmax=2, mmax=1, sphere_channels=8, attn_hidden_channels=8, num_heads=2,
            attn_alpha_channels=4, attn_value_channels=2, ffn_hidden_channels=8, edge_channels=8,
            num_distance_basis=16, max_radius=5.0, max_neighbors=12, alpha_drop=0.0, drop_path_rate=0.0)


def test_anisotropic_basis_is_the_degree_2_harmonics():
    """T_k orthonormal, symmetric, traceless, and sum_k Y2_k(r) T_k = c (r r^T - |r|^2 I / 3) for e3nn's
    degree-2 harmonics: the anisotropic part of a decomposed head lives in the harmonics' basis."""
    from e3nn import o3

    basis = _anisotropic_basis().reshape(5, 3, 3)
    assert torch.allclose(torch.einsum("kij,lij->kl", basis, basis), torch.eye(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(basis, basis.transpose(1, 2)) and torch.allclose(torch.einsum("kii->k", basis), torch.zeros(5, dtype=torch.float64))
    r = torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y2 = o3.spherical_harmonics(2, r, False, normalization="component")
    tensor = torch.einsum("ek,kij->eij", y2, basis)
    traceless = r[:, :, None] * r[:, None, :] - (r * r).sum(1)[:, None, None] * torch.eye(3, dtype=torch.float64) / 3
    ratio = tensor / traceless
    assert torch.allclose(ratio[traceless.abs() > 1e-3], torch.tensor(math.sqrt(15.0 / 2.0), dtype=torch.float64))


def test_isotropic_part_is_the_trace():
    stress = symmetric_tensor(torch.tensor([math.sqrt(3.0) * 0.25]), torch.zeros(1, 5))
    assert torch.allclose(stress, 0.25 * torch.eye(3).expand(1, 3, 3))


@pytest.mark.parametrize("head", [Rank2HeadConfig(decompose=True, use_source_target_embedding=True),
                                  Rank2HeadConfig(decompose=False, edge_level_mlp=True, extensive=True)])
def test_shape_buckets_do_not_change_the_stress_or_a_mean_energy(head):
    """Padding atoms and edges (an inert dummy structure) leave every output as it was."""
    crystals = [bulk("Cu", "fcc", a=3.6, cubic=True), bulk("NaCl", "rocksalt", a=5.6)]
    for atoms in crystals:
        atoms.rattle(0.05, seed=1)
    batch = batch_from_atoms(crystals, torch.float64)
    torch.manual_seed(0)
    plain = EquiformerV2(ModelConfig(**TINY, stress_head=head, energy_reduce="mean")).double().eval()
    padded = apply_plan(EquiformerV2(ModelConfig(**TINY, stress_head=head, energy_reduce="mean")),
                        ExecutionPlan(pad_atoms_multiple=16, pad_edges_multiple=256)).double().eval()
    padded.load_state_dict(plain.state_dict())
    with torch.no_grad():
        a, b = plain(batch), padded(batch)
    keys = {"energy", "forces", *(("stress_isotropic", "stress_anisotropic") if head.decompose else ("stress_direct",))}
    assert set(a) == keys == set(b)
    for key in keys:
        assert torch.allclose(a[key], b[key], rtol=1e-10, atol=1e-12), key
    sums = EquiformerV2(ModelConfig(**TINY, stress_head=head, avg_num_nodes=1.0)).double().eval()
    sums.load_state_dict(plain.state_dict())
    with torch.no_grad():  # mean = sum / atoms of the structure
        assert torch.allclose(sums(batch)["energy"] / batch.natoms.double(), a["energy"], rtol=1e-12)
