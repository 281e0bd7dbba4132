"""Whole-model properties: published sizes, invariances, determinism, precision, bad input."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

from eqv2.config import ConfigError, from_dict, load_yaml
from eqv2.execution import REFERENCE, ExecutionPlan, apply_plan
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2, count_parameters
from eqv2.model.graph import GraphInputError
from tests.model.equivariance import batch_from_atoms

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"
TINY = dict(num_layers=2, lmax=3, mmax=2, sphere_channels=12, attn_hidden_channels=12, attn_alpha_channels=6,
            attn_value_channels=3, ffn_hidden_channels=12, edge_channels=12, num_heads=2, max_radius=6.0,
            max_neighbors=1000, alpha_drop=0.0, drop_path_rate=0.0)


def tiny(plan: ExecutionPlan = REFERENCE, **kw) -> EquiformerV2:
    torch.manual_seed(0)
    return apply_plan(EquiformerV2(ModelConfig(**{**TINY, **kw})), plan).double().eval()


@pytest.mark.parametrize("name,count", [("eqv2_31M", 31_058_690), ("eqv2_83M", 83_164_802), ("eqv2_153M", 153_602_690)])
def test_published_parameter_counts(name, count):
    cfg = from_dict(ModelConfig, load_yaml(CONFIGS / f"{name}.yaml"))
    assert count_parameters(EquiformerV2(cfg)) == count


def test_beyond_paper_config_builds_with_its_documented_size():
    cfg = from_dict(ModelConfig, load_yaml(CONFIGS / "eqv2_1B_L8.yaml"))
    # count without allocating 1.4 B weights: a 2-block copy, then per-block scaling
    two = count_parameters(EquiformerV2(replace(cfg, num_layers=2)))
    one = count_parameters(EquiformerV2(replace(cfg, num_layers=1)))
    assert one + (cfg.num_layers - 1) * (two - one) == 1_395_507_842


def test_unknown_or_ill_typed_config_key_is_named():
    with pytest.raises(ConfigError, match="lmaxx"):
        from_dict(ModelConfig, {"lmaxx": 4})
    with pytest.raises(ConfigError, match="norm_type"):
        from_dict(ModelConfig, {"norm_type": "batch_norm"})
    with pytest.raises(ConfigError, match="mmax"):
        from_dict(ModelConfig, {"lmax": 2, "mmax": 3})


def test_translation_and_permutation(oc20_atoms):
    m = tiny()
    b = batch_from_atoms([oc20_atoms])
    ref = m(b)
    moved = m(replace(b, pos=b.pos + torch.tensor([1.3, -7.2, 0.4], dtype=torch.float64)))
    assert torch.allclose(moved["energy"], ref["energy"], atol=1e-10)
    assert torch.allclose(moved["forces"], ref["forces"], atol=1e-10)
    perm = torch.randperm(len(oc20_atoms), generator=torch.Generator().manual_seed(1))
    permuted = m(replace(b, pos=b.pos[perm], atomic_numbers=b.atomic_numbers[perm]))
    assert torch.allclose(permuted["energy"], ref["energy"], atol=1e-10)
    assert torch.allclose(permuted["forces"], ref["forces"][perm], atol=1e-10)


def test_invariant_to_choice_of_periodic_cell():
    crystal = bulk("NaCl", "rocksalt", a=5.64)
    crystal.rattle(0.05, seed=2)
    other = crystal.copy()
    # same lattice, another basis (unimodular integer change) and positions wrapped into it
    other.set_cell(np.array([[1, 1, 0], [0, 1, 0], [-1, 0, 1]]) @ np.array(crystal.cell), scale_atoms=False)
    other.wrap()
    m = tiny()
    a, b = m(batch_from_atoms([crystal])), m(batch_from_atoms([other]))
    assert torch.allclose(a["energy"], b["energy"], atol=1e-10)
    assert torch.allclose(a["forces"], b["forces"], atol=1e-10)


def test_forward_is_deterministic_and_stores_nothing(oc20_atoms):
    m = tiny()
    before = {name: dict(vars(mod)) for name, mod in m.named_modules()}
    b = batch_from_atoms([oc20_atoms, oc20_atoms])
    out1, out2 = m(b), m(b)
    assert torch.equal(out1["energy"], out2["energy"]) and torch.equal(out1["forces"], out2["forces"])
    after = {name: dict(vars(mod)) for name, mod in m.named_modules()}
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), name
    assert torch.allclose(out1["energy"][0], out1["energy"][1])


def test_bf16_autocast_keeps_geometry_in_fp32_and_stays_close(oc20_atoms):
    torch.manual_seed(0)
    m = EquiformerV2(ModelConfig(**TINY)).eval()
    b = batch_from_atoms([oc20_atoms], torch.float32)
    ref = m(b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(b)
    assert low["energy"].dtype == torch.float32 and low["forces"].dtype == torch.float32
    rel = (low["forces"] - ref["forces"]).norm() / ref["forces"].norm()
    assert rel < 0.05, rel


def test_backward_reaches_every_parameter(oc20_atoms):
    torch.manual_seed(0)
    m = EquiformerV2(ModelConfig(**TINY)).train()
    out = m(batch_from_atoms([oc20_atoms], torch.float32))
    (out["energy"].sum() + out["forces"].pow(2).sum()).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def _bad(structure: Atoms, match: str, **kw):
    m = tiny(**kw)
    ok = Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]])
    b = batch_from_atoms([ok, structure])
    b.ids = ["fine", "bad_sid_7"]
    with pytest.raises(GraphInputError, match=match) as info:
        m(b)
    assert "bad_sid_7" in str(info.value)


def test_bad_inputs_name_the_structure():
    _bad(Atoms("Cu2", positions=[[0, 0, 0], [20, 0, 0]]), "no neighbour")
    _bad(Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 0]]), "coincide")
    _bad(Atoms("CuU", positions=[[0, 0, 0], [2, 0, 0]]), "atomic number 92", max_num_elements=90)
    _bad(Atoms("Cu2", positions=[[0, 0, 0], [np.nan, 0, 0]]), "non-finite")
    _bad(Atoms("Cu2", positions=[[0, 0, 0], [2, 0, 0]], cell=[[3, 0, 0], [6, 0, 0], [0, 0, 3]], pbc=True), "singular")
    m = tiny()
    b = batch_from_atoms([Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]])])
    empty = replace(b, natoms=torch.tensor([2, 0]), cell=b.cell.repeat(2, 1, 1), pbc=b.pbc.repeat(2, 1), ids=["a", "empty_one"])
    with pytest.raises(GraphInputError, match="empty_one.*empty structure"):
        m(empty)


def test_stochastic_depth_decides_per_structure_and_only_in_training():
    from eqv2.model.transformer_block import drop_path_scales

    torch.manual_seed(0)
    graph_of_atom = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    scales = drop_path_scales(4, graph_of_atom, 3, 0.25, True, torch.float32)  # [L, 2, N]
    assert scales.shape == (4, 2, 9)
    for g in range(3):  # one decision per structure, block and update
        member = scales[:, :, graph_of_atom == g]
        assert torch.equal(member, member[:, :, :1].expand_as(member))
    assert set(scales.unique().tolist()) <= {0.0, float(torch.tensor(1.0 / 0.75, dtype=torch.float32))}
    many = drop_path_scales(2000, graph_of_atom, 3, 0.25, True, torch.float64)
    assert abs(float((many == 0).double().mean()) - 0.25) < 0.02
    assert drop_path_scales(4, graph_of_atom, 3, 0.25, False, torch.float32) is None
    assert drop_path_scales(4, graph_of_atom, 3, 0.0, True, torch.float32) is None


def _outputs_and_gradients(m, b) -> tuple:
    """Energy, forces and the gradient of every parameter of one forward/backward pass."""
    out = m(b)
    grads = torch.autograd.grad(out["energy"].sum() + out["forces"].square().sum(), list(m.parameters()))
    return (out["energy"], out["forces"], *grads)


def test_so2_input_gradient_op_leaves_the_model_unchanged(oc20_atoms):
    """With the fused input gradient (and its indexed form) in every SO(2) convolution, energies, forces and
    every parameter gradient of the model are bit-identical (float64, eager)."""
    from eqv2.kernels.fused_so2 import FusedSO2Convolution
    from eqv2.model.so2_convolution import SO2Convolution

    b = batch_from_atoms([oc20_atoms], torch.float64)
    results = []
    for fused, indexed in ((False, False), (True, False), (True, True)):
        # the plan reaches every SO(2) convolution
        m = tiny(ExecutionPlan(so2_fused_input_grad=fused, so2_indexed_radial=indexed)).train()
        convs = [module for module in m.modules() if isinstance(module, SO2Convolution)]
        assert len(convs) > 2 and all((isinstance(conv, FusedSO2Convolution), getattr(conv, "indexed_radial", False))
                                      == (fused, indexed) for conv in convs)
        results.append(_outputs_and_gradients(m, b))
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


def test_rotation_align_leaves_the_model_unchanged(oc20_atoms):
    """rotation_align 8 (Wigner matrices in row-padded buffers) gives bit-identical energies, forces and
    gradients (float64, eager)."""
    b = batch_from_atoms([oc20_atoms], torch.float64)
    results = []
    for align in (1, 8):
        m = tiny(ExecutionPlan(rotation_align=align)).train()
        results.append(_outputs_and_gradients(m, b))
    for a, c in zip(*results):
        assert torch.equal(a, c)


@pytest.mark.parametrize("kernels", [dict(), dict(so2_fused_input_grad=True, rotation_align=8),
                                     dict(so2_fused_input_grad=True, so2_indexed_radial=True)])
def test_rotation_matrices_are_cast_once_to_the_autocast_dtype(kernels):
    """Under autocast the edge rotation holds bf16 matrices and the blocks get a bf16 distance basis
    (computed in float32, cast once per forward) so that no block casts them again; outputs and
    gradients are bit-identical to float32 matrices and basis that every product would cast itself."""
    from tests.model.fairchem_reference import slab_structures

    seen = []

    def run(force_dtype):
        torch.manual_seed(0)
        model = apply_plan(EquiformerV2(ModelConfig(**TINY)), ExecutionPlan(**kernels)).train()  # float32, as trained
        frames = model.edge_frames

        def edge_frames(edge_vec, distance, dtype):
            out = frames(edge_vec, distance, force_dtype or dtype)
            seen.append(tuple(t.dtype for t in out))
            return out
        model.edge_frames = edge_frames
        batch = batch_from_atoms(slab_structures(0, 3), torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch)
        (out["energy"].sum() + out["forces"].pow(2).sum()).backward()
        return [out["energy"], out["forces"]] + [p.grad for p in model.parameters() if p.grad is not None]

    fast, reference = run(None), run(torch.float32)
    assert seen == [(torch.bfloat16,) * 3, (torch.float32,) * 3]
    assert len(fast) == len(reference) and all(torch.equal(a, b) for a, b in zip(fast, reference))
