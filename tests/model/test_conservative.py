"""Gradient forces and stress (`forces: gradient`, eqv2/model/conservative.py), in float64: they are the
finite-difference derivatives of the energy, rotate as vectors and rank-2 tensors, and a loss on them
reaches the weights (double backward) with the gradient finite differences of the loss give."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from eqv2.training.activation_checkpointing import ActivationCheckpointConfig, apply_activation_checkpointing
from tests.model.equivariance import batch_from_atoms, random_rotations, rotate_batch

TINY = dict(num_layers=2, lmax=3, mmax=2, sphere_channels=8, attn_hidden_channels=8, attn_alpha_channels=4,
            attn_value_channels=2, ffn_hidden_channels=8, edge_channels=8, num_heads=2, num_distance_basis=16,
            max_radius=4.5, max_neighbors=1000, alpha_drop=0.0, drop_path_rate=0.0, forces="gradient")


def gradient_model(**overrides) -> EquiformerV2:
    torch.manual_seed(0)
    return EquiformerV2(ModelConfig(**{**TINY, **overrides})).double().eval()


def crystal():
    atoms = bulk("NaCl", "rocksalt", a=5.0)
    cell = np.array(atoms.cell) @ np.array([[1.0, 0.12, -0.08], [0.05, 0.97, 0.15], [0.1, -0.04, 1.08]])
    atoms.set_cell(cell, scale_atoms=True)
    atoms = atoms * (2, 1, 1)
    atoms.rattle(0.15, seed=3)
    return atoms


def ethanol():
    m = molecule("CH3CH2OH")
    m.rattle(0.05, seed=1)
    return m


def energy(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch)["energy"]


@pytest.mark.parametrize("envelope", ["none", "polynomial"])
def test_forces_are_minus_the_energy_gradient(envelope):
    model = gradient_model(cutoff_envelope=envelope)
    batch = batch_from_atoms([crystal(), ethanol()])
    with torch.no_grad():
        forces = model(batch)["forces"]
    rng = np.random.default_rng(0)
    h = 1e-5
    for atom in rng.choice(batch.pos.shape[0], 6, replace=False):
        for k in range(3):
            plus, minus = batch.pos.clone(), batch.pos.clone()
            plus[atom, k] += h
            minus[atom, k] -= h
            e_plus, e_minus = energy(model, replace(batch, pos=plus)), energy(model, replace(batch, pos=minus))
            numeric = -float((e_plus - e_minus).sum()) / (2 * h)
            assert abs(float(forces[atom, k]) - numeric) <= 1e-7 + 1e-6 * abs(numeric), (atom, k)


def _strained(batch, eps: torch.Tensor):
    """The first structure of `batch` deformed by (I + eps)."""
    deform = torch.eye(3, dtype=torch.float64) + eps
    pos = batch.pos.clone()
    first = batch.batch == 0
    pos[first] = pos[first] @ deform
    cell = batch.cell.clone()
    cell[0] = cell[0] @ deform
    return replace(batch, pos=pos, cell=cell)


def test_stress_is_the_strain_derivative_over_the_volume():
    model = gradient_model()
    batch = batch_from_atoms([crystal(), crystal()[:3]])
    with torch.no_grad():
        out = model(batch)
    volume = abs(float(torch.linalg.det(batch.cell[0])))
    stress = out["stress"][0]
    assert torch.allclose(stress, stress.T, atol=1e-12)
    h = 1e-6
    for i in range(3):
        for j in range(i, 3):
            eps = torch.zeros(3, 3, dtype=torch.float64)
            # a symmetric strain: eps_ii = h, or eps_ij = eps_ji = h/2; either way dE/dh = V stress_ij
            eps[i, j] = eps[j, i] = h if i == j else h / 2
            d = float(energy(model, _strained(batch, eps))[0] - energy(model, _strained(batch, -eps))[0]) / (2 * h)
            expected = d / volume
            assert abs(float(stress[i, j]) - expected) <= 1e-8 + 1e-6 * abs(expected), (i, j, stress[i, j], expected)


def test_a_structure_without_a_cell_has_nan_stress_and_finite_forces():
    model = gradient_model()
    with torch.no_grad():
        out = model(batch_from_atoms([ethanol(), crystal()]))
    assert torch.isnan(out["stress"][0]).all() and torch.isfinite(out["stress"][1]).all()
    assert torch.isfinite(out["forces"]).all()


@pytest.mark.parametrize("name", ["crystal", "molecule"])
def test_forces_and_stress_rotate_with_the_structure(name):
    model = gradient_model(activation="gate", use_grid_mlp=False)  # exactly equivariant (test_equivariance)
    batch = batch_from_atoms([crystal() if name == "crystal" else ethanol()])
    with torch.no_grad():
        ref = model(batch)
        f_scale = float(ref["forces"].abs().max())
        for rot in random_rotations(6, seed=17):
            out = model(rotate_batch(batch, rot))
            assert float((out["energy"] - ref["energy"]).abs().max()) <= 1e-9 * float(ref["energy"].abs().max())
            assert float((out["forces"] - ref["forces"] @ rot.T).abs().max()) <= 1e-9 * f_scale
            if name == "crystal":
                expected = rot @ ref["stress"][0] @ rot.T
                scale = float(ref["stress"].abs().max())
                assert float((out["stress"][0] - expected).abs().max()) <= 1e-9 * scale


def _force_loss(model, batch) -> torch.Tensor:
    out = model(batch)
    return (out["forces"] ** 2).sum() + 0.3 * out["energy"].sum() + (out["stress"][0] ** 2).sum() * 100.0


@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_force_and_stress_loss_reaches_the_weights(checkpointed):
    """Double backward: d(loss on forces and stress)/d(weight) matches finite differences of the loss;
    with activation checkpointing (non-reentrant) too."""
    model = gradient_model().train()  # dropout rates are 0: train mode only turns on the graph
    if checkpointed:
        assert apply_activation_checkpointing(model, ActivationCheckpointConfig(enabled=True)) == [0, 1]
    batch = batch_from_atoms([crystal()])
    loss = _force_loss(model, batch)
    params = dict(model.named_parameters())
    names = ["blocks.0.ga.so2_conv_1.fc_m0.weight", "energy_head.so3_linear_2.weight", "atom_embedding.weight"]
    names = [n for n in names if n in params]
    assert len(names) >= 2, sorted(params)[:20]
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    h = 1e-6
    for name, grad in zip(names, grads):
        param = params[name]
        index = tuple(int(i) for i in torch.nonzero(grad.abs() > 0)[0])
        with torch.no_grad():
            param[index] += h
            up = float(_force_loss(model, batch))
            param[index] -= 2 * h
            down = float(_force_loss(model, batch))
            param[index] += h
        numeric = (up - down) / (2 * h)
        assert abs(float(grad[index]) - numeric) <= 1e-6 + 1e-5 * abs(numeric), (name, float(grad[index]), numeric)


@pytest.mark.parametrize("envelope, continuous", [("none", False), ("polynomial", True)])
def test_the_envelope_makes_the_energy_continuous_at_the_cutoff(envelope, continuous):
    """Atoms 0 and 2 just inside and just outside max_radius (atom 1 between them keeps both connected):
    the paper's energy jumps, the enveloped one does not."""
    from ase import Atoms

    model = gradient_model(cutoff_envelope=envelope)
    cutoff = TINY["max_radius"]
    energies = []
    for r in (cutoff - 1e-6, cutoff + 1e-6):
        trimer = Atoms("CuOCu", positions=[[0, 0, 0], [2.0, 0.3, 0], [r, 0, 0]])
        energies.append(float(energy(model, batch_from_atoms([trimer]))[0]))
    jump = abs(energies[0] - energies[1])
    assert (jump < 1e-9) if continuous else (jump > 1e-4), jump


def test_fused_kernels_without_a_double_backward_are_refused():
    from eqv2.execution import ExecutionPlan, apply_plan

    model = EquiformerV2(ModelConfig(**{**TINY, "forces": "gradient"}))
    for key in ("so2_fused_input_grad", "fused_rotation", "fused_s2_activation"):
        with pytest.raises(ValueError, match=f"execution.{key}: not supported with forces: gradient"):
            apply_plan(model, ExecutionPlan(**{key: True}))


def test_a_gradient_model_has_no_direct_head():
    assert gradient_model().force_head is None
    assert gradient_model(forces="direct").force_head is not None


def test_the_calculator_reports_stress_of_a_gradient_model_only(tmp_path):
    """ASE stress (Voigt, eV/Å^3) from a saved gradient model: energy_std scales it, it matches ASE's own
    finite-difference stress; forces match ASE's finite-difference forces; a direct model has no stress."""
    from ase.calculators.calculator import PropertyNotImplementedError

    from ase.calculators.fd import calculate_numerical_stress
    from ase.stress import full_3x3_to_voigt_6_stress

    from eqv2.calculator import EquiformerV2Calculator, atoms_to_batch
    from eqv2.checkpoint import Normalizers, load_model, save_model

    norms = Normalizers(energy_mean=-3.0, energy_std=2.0, forces_std=2.0)
    for forces in ("gradient", "direct"):
        cfg = ModelConfig(**{**TINY, "forces": forces})
        save_model(tmp_path / f"{forces}.pt", EquiformerV2(cfg), cfg, norms)
    atoms = crystal()
    potential = load_model(tmp_path / "gradient.pt")
    atoms.calc = EquiformerV2Calculator(potential, threads=None)
    assert "stress" in atoms.calc.implemented_properties
    stress = atoms.get_stress()
    batch = atoms_to_batch([atoms])
    with torch.no_grad():
        raw = potential.model(batch)["stress"][0].double().numpy()
    assert np.allclose(stress, full_3x3_to_voigt_6_stress(raw) * norms.energy_std, rtol=1e-6, atol=1e-12)
    # ASE's own finite differences, in float32 (the calculator's precision): a loose bound
    numeric = calculate_numerical_stress(atoms, eps=1e-3)
    assert np.abs(stress - numeric).max() <= 0.01 * np.abs(stress).max(), (stress, numeric)
    direct = crystal()
    direct.calc = EquiformerV2Calculator(str(tmp_path / "direct.pt"), threads=None)
    assert "stress" not in direct.calc.implemented_properties
    with pytest.raises(PropertyNotImplementedError):
        direct.get_stress()


def test_under_bf16_autocast_the_geometry_stays_in_full_precision():
    """The strain and positions are computed with autocast off: bf16 positions (3 significant digits)
    would move atoms by ~0.01 Å.  Forces and stress under autocast stay close to float32's."""
    torch.manual_seed(0)
    model = EquiformerV2(ModelConfig(**TINY)).eval()
    batch = batch_from_atoms([crystal()], dtype=torch.float32)
    with torch.no_grad():
        ref = model(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(batch)
    for key in ("forces", "stress"):
        scale = float(ref[key].abs().max())
        assert float((low[key].float() - ref[key]).abs().max()) < 0.1 * scale, key
    # an analytic energy, E = sum |x|^2 + sum of the cell's squares: forces -2x, stress 2 (sum x x^T + h^T h) / V
    from eqv2.model.conservative import gradient_outputs

    def quadratic(b):
        return (b.pos ** 2).sum().reshape(1) + (b.cell ** 2).sum().reshape(1)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gradient_outputs(quadratic, batch)
    pos, cell = batch.pos.double(), batch.cell[0].double()
    expected = 2 * (pos.T @ pos + cell.T @ cell) / torch.linalg.det(cell).abs()
    torch.testing.assert_close(out["forces"].double(), -2 * pos, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["stress"][0].double(), expected, rtol=1e-5, atol=1e-7)


def _saved_bytes_and_grads(checkpointed: bool):
    """The bytes autograd keeps for the backward of the force and stress loss (every tensor packed by the
    forward and by the force computation's create_graph backward), and the loss's parameter gradients."""
    model = gradient_model().train()
    if checkpointed:
        apply_activation_checkpointing(model, ActivationCheckpointConfig(enabled=True))
    batch = batch_from_atoms([crystal()])
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch)
        loss = (out["forces"] ** 2).sum() + 0.3 * out["energy"].sum() + (out["stress"][0] ** 2).sum() * 100.0
    forces = out["forces"].detach()
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return sum(saved), forces, dict(zip(names, grads))


def test_checkpointed_gradient_forces_equal_the_unchecked_ones_and_keep_fewer_tensors():
    """Activation checkpointing composed with the double backward (forces: gradient): the forces and every
    parameter gradient of a force + stress loss equal the unchecked ones in float64, and the tensors autograd
    keeps shrink, but only by the forward's activations (measured here: 46.1 MB unchecked -> 38.4 MB, -17%):
    the create_graph backward inside the forward recomputes each block and its own saved tensors (the
    graph the force loss's backward differentiates) stay, so checkpointing alone does not remove the bulk."""
    plain_bytes, plain_forces, plain_grads = _saved_bytes_and_grads(False)
    ac_bytes, ac_forces, ac_grads = _saved_bytes_and_grads(True)
    torch.testing.assert_close(ac_forces, plain_forces, rtol=1e-12, atol=1e-12)
    assert plain_grads.keys() == ac_grads.keys()
    for name, grad in plain_grads.items():
        if grad is None:
            assert ac_grads[name] is None, name
            continue
        torch.testing.assert_close(ac_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    assert ac_bytes < 0.9 * plain_bytes, (ac_bytes, plain_bytes)
