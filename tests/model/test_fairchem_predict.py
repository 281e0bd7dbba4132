"""A fairchem checkpoint, converted, predicts what fairchem predicts: fairchem builds its own graph.

Random perturbed weights built by fairchem-core 1.10.0, saved in the layout its trainers save
(legacy `equiformer_v2` with `model_attributes`, and hydra backbone + heads), converted with
`eqv2 convert` and predicted with `python -m eqv2.predict` (a real process) and
the ASE calculator.  The reference runs fairchem's own forward on the batch its OCPCalculator makes (positions
wrapped into the cell) with otf_graph on (its radius graph,
CUDA's tie rule: `fairchem_reference.stable_sort`) and its own Normalizer and LinearReferences modules.
Frames: the real OC20 structure (12 atoms with neighbour ties), an unrattled ideal slab, a slab with
fixed ideal layers under a rattled top and adsorbate, a strained bulk crystal (periodic in 3D).
"""
from __future__ import annotations

import subprocess
import sys

import ase.io
import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, bulk, fcc100, fcc111, molecule

from eqv2.calculator import EquiformerV2Calculator
from eqv2.model.config import ModelConfig
from tests.conftest import REPO

fr = pytest.importorskip("tests.model.fairchem_reference")
try:
    LEGACY, HYDRA = fr.import_fairchem()
except ImportError as err:  # pragma: no cover - CI installs fairchem-core
    pytest.skip(f"fairchem-core 1.10.0 not importable: {err}", allow_module_level=True)

SMALL = ModelConfig(num_layers=2, lmax=4, mmax=2, sphere_channels=16, attn_hidden_channels=16, attn_alpha_channels=8,
                    attn_value_channels=4, ffn_hidden_channels=16, edge_channels=16, num_heads=2, alpha_drop=0.0,
                    drop_path_rate=0.0)
E_MEAN, E_STD, F_STD = -0.75, 2.9, 1.7


def frames(oc20_atoms, tmp_path):
    ideal = fcc111("Pt", size=(2, 2, 4), vacuum=8.0)
    slab = fcc100("Cu", size=(3, 3, 4), vacuum=8.0)
    add_adsorbate(slab, molecule("CO"), 2.0, "ontop")
    top = slab.positions[:, 2] > np.sort(np.unique(slab.positions[:36, 2].round(3)))[1] + 0.1
    slab.positions[top] += np.random.default_rng(0).normal(scale=0.05, size=(int(top.sum()), 3))
    crystal = bulk("ZnO", "wurtzite", a=3.25, c=5.21, u=0.38) * (2, 1, 1)  # forces do not vanish by symmetry
    crystal.set_cell(np.array(crystal.cell) @ (np.eye(3) + [[0.02, 0.01, 0], [0.01, -0.01, 0], [0, 0, 0.015]]),
                     scale_atoms=True)
    path = tmp_path / "frames.extxyz"
    ase.io.write(path, [oc20_atoms, ideal, slab, crystal])
    return path, ase.io.read(path, index=":")  # the reference sees the positions eqv2 reads from the file


def legacy_checkpoint(strict: bool, lin_ref: str):
    """(checkpoint dict, reference(atoms) -> (E, F)) of a legacy model; lin_ref: "used", "unused" or "none"."""
    hp = {**fr.fairchem_hparams(SMALL), "otf_graph": True, "enforce_max_neighbors_strictly": strict,
          "use_energy_lin_ref": lin_ref == "used", "load_energy_lin_ref": lin_ref != "none"}
    torch.manual_seed(0)
    model = LEGACY.EquiformerV2(**hp).eval()
    fr.perturb_(model, seed=4)
    if lin_ref != "none":
        with torch.no_grad():  # E_ref / E_std per element, as fairchem stores it
            model.energy_lin_ref.copy_(torch.randn(SMALL.max_num_elements, generator=torch.Generator().manual_seed(5)))
    checkpoint = {"config": {"model": "equiformer_v2", "model_attributes": hp,
                             "dataset": [{"normalize_labels": True, "target_mean": E_MEAN, "target_std": E_STD,
                                          "grad_target_mean": 0.0, "grad_target_std": F_STD}]},
                  "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "ema": None, "step": 7,
                  "normalizers": {"target": {"mean": torch.tensor(E_MEAN), "std": torch.tensor(E_STD)},
                                  "grad_target": {"mean": torch.tensor(0.0), "std": torch.tensor(F_STD)}}}

    def reference(atoms):
        data = fr.calculator_batch(atoms)  # as fairchem's OCPCalculator
        with fr.deterministic_frames(LEGACY, HYDRA), fr.stable_sort(), torch.no_grad():
            out = model(data)
        return _denormalise(checkpoint, out["energy"].reshape(-1), out["forces"], data)

    return checkpoint, reference


def hydra_checkpoint(strict: bool, generic_heads: bool = False):
    """A backbone + heads model whose trainer adds per-element references (elementrefs) after
    denormalising, with fairchem 1.x's Normalizer state dicts.  generic_heads: the scalar / vector
    heads (equiformerV2_scalar_head, equiformerV2_vector_head) instead of the energy / force ones."""
    from fairchem.core.models.equiformer_v2.heads import EqV2ScalarHead, EqV2VectorHead

    hp = {**fr.fairchem_hparams(SMALL), "otf_graph": True, "enforce_max_neighbors_strictly": strict}
    torch.manual_seed(0)
    backbone = HYDRA.EquiformerV2Backbone(**hp).eval()
    if generic_heads:
        heads = EqV2ScalarHead(backbone).eval(), EqV2VectorHead(backbone).eval()
        modules = {"energy": {"module": "equiformerV2_scalar_head", "reduce": "sum"},
                   "forces": {"module": "equiformerV2_vector_head", "output_name": "forces"}}
    else:
        heads = HYDRA.EquiformerV2EnergyHead(backbone).eval(), HYDRA.EquiformerV2ForceHead(backbone).eval()
        modules = {"energy": {"module": "equiformer_v2_energy_head"}, "forces": {"module": "equiformer_v2_force_head"}}
    for i, m in enumerate((backbone, *heads)):
        fr.perturb_(m, seed=20 + i)
    sd = {f"module.backbone.{k}": v for k, v in backbone.state_dict().items()}
    for name, head in zip(("energy", "forces"), heads):
        sd.update({f"module.output_heads.{name}.{k}": v for k, v in head.state_dict().items()})
    refs = torch.zeros(119)
    refs[1:90] = 3.0 * torch.randn(89, generator=torch.Generator().manual_seed(6))
    model_cfg = {"name": "hydra", "backbone": {**hp, "model": "equiformer_v2_backbone"}, "heads": modules,
                 "otf_graph": True, "pass_through_head_outputs": False}
    checkpoint = {"config": {"model": model_cfg, "dataset": {"train": {}}}, "state_dict": sd, "ema": None, "step": 9,
                  "normalizers": {"energy": {"mean": torch.tensor(E_MEAN), "rmsd": torch.tensor(E_STD)},
                                  "forces": {"mean": torch.tensor(0.0), "rmsd": torch.tensor(F_STD)}},
                  "elementrefs": {"energy": {"element_references": refs}}}

    def reference(atoms):
        data = fr.calculator_batch(atoms)  # as fairchem's OCPCalculator
        with fr.deterministic_frames(LEGACY, HYDRA), fr.stable_sort(), torch.no_grad():
            emb = backbone(data)
            energy, forces = heads[0](data, emb)["energy"].reshape(-1), heads[1](data, emb)["forces"]
        return _denormalise(checkpoint, energy, forces, data)

    return checkpoint, reference


def _denormalise(checkpoint, energy, forces, data):
    """fairchem's trainer (OCPTrainer._denorm_preds): its Normalizer modules, then its LinearReferences."""
    from fairchem.core.modules.normalization.element_references import create_element_references
    from fairchem.core.modules.normalization.normalizer import create_normalizer

    norms = checkpoint["normalizers"]
    energy_norm = create_normalizer(state_dict=dict(norms.get("energy", norms.get("target"))))
    forces_norm = create_normalizer(state_dict=dict(norms.get("forces", norms.get("grad_target"))))
    energy = energy_norm(energy.view(len(data.natoms), -1))  # the trainer's [structures, 1] outputs
    if "elementrefs" in checkpoint:
        energy = create_element_references(state_dict=checkpoint["elementrefs"]["energy"])(energy, data)
    energy = energy.reshape(-1)
    return energy.detach().double().numpy(), forces_norm(forces).detach().double().numpy()


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


CASES = {
    "legacy_lin_ref": lambda: legacy_checkpoint(strict=True, lin_ref="used"),
    "legacy_tolerant_lin_ref_unused": lambda: legacy_checkpoint(strict=False, lin_ref="unused"),
    "hydra_elementrefs": lambda: hydra_checkpoint(strict=True),
    "hydra_generic_heads_tolerant": lambda: hydra_checkpoint(strict=False, generic_heads=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_checkpoint_predicts_as_fairchem(case, oc20_atoms, tmp_path):
    from eqv2.tools.convert import main as convert

    checkpoint, reference = CASES[case]()
    src, dst, out = tmp_path / "fairchem.pt", tmp_path / "eqv2.pt", tmp_path / "pred.npz"
    torch.save(checkpoint, src)
    assert convert([str(src), str(dst)]) == 0
    path, structures = frames(oc20_atoms, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "eqv2.predict", "--checkpoint", str(dst), "--input", str(path),
                           "--output", str(out), "--device", "cpu"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    predicted = np.load(out)
    calc = EquiformerV2Calculator(str(dst), device="cpu")
    start = 0
    for i, atoms in enumerate(structures):
        ref_e, ref_f = reference(atoms)
        forces = predicted["forces"][start:start + len(atoms)]
        start += len(atoms)
        assert rel_err(predicted["energy"][i:i + 1], ref_e) <= 1e-5, (i, predicted["energy"][i], ref_e)
        assert rel_err(forces, ref_f) <= 1e-5, i
        if i in (0, 1):  # the ASE calculator too, on the frames with ties
            atoms.calc = calc
            assert rel_err(np.array([atoms.get_potential_energy()]), ref_e) <= 1e-5
            assert rel_err(atoms.get_forces(apply_constraint=False), ref_f) <= 1e-5


def test_references_change_the_energy_by_their_sum(oc20_atoms, tmp_path):
    """The exported model records the references: the same weights without them predict energies lower
    by exactly the per-atom sum; forces do not change."""
    import eqv2
    from eqv2.calculator import atoms_to_batch
    from eqv2.checkpoint import read_model_file
    from eqv2.tools.convert import main as convert

    checkpoint, _ = hydra_checkpoint(strict=True)
    torch.save(checkpoint, tmp_path / "fairchem.pt")
    assert convert([str(tmp_path / "fairchem.pt"), str(tmp_path / "eqv2.pt")]) == 0
    saved = torch.load(tmp_path / "eqv2.pt", weights_only=True)
    assert saved["version"] == 2
    refs = np.array(saved["energy_references"])
    assert np.allclose(refs, checkpoint["elementrefs"]["energy"]["element_references"][:90].numpy(), atol=1e-6)
    potential = eqv2.load_model(tmp_path / "eqv2.pt")
    batch = atoms_to_batch([oc20_atoms])
    with torch.no_grad():
        full, plain = potential(batch), potential.model(batch)
    expected = plain["energy"].double() * E_STD + E_MEAN + refs[oc20_atoms.numbers].sum()
    assert abs(float(full["energy"][0]) - float(expected[0])) <= 1e-5 * abs(float(expected[0]))
    assert np.allclose(read_model_file(tmp_path / "eqv2.pt")[4], refs)  # fine-tuning from it keeps them


def test_batches_hold_the_positions_fairchem_wraps(oc20_atoms, tmp_path):
    """eqv2's batches (the calculator, `eqv2 predict`) hold the positions wrapped into the cell as fairchem's
    AtomsToGraphs wraps them, bit for bit in float32: on the ideal slab, unwrapped positions make eqv2 keep other
    neighbours among ties than fairchem's calculator (forces 49 % apart).  Structures without a periodic cell
    vector keep their positions."""
    from eqv2.calculator import atoms_to_batch

    _, structures = frames(oc20_atoms, tmp_path)
    for atoms in structures:
        assert torch.equal(atoms_to_batch([atoms]).pos, fr.calculator_batch(atoms).pos)
    assert any(not np.allclose(atoms_to_batch([a]).pos.numpy(), a.positions, atol=1e-3) for a in structures)
    co = molecule("CO")  # no cell, not periodic
    assert np.array_equal(atoms_to_batch([co]).pos.numpy(), co.positions.astype(np.float32))
    co.pbc = True  # periodic without cell vectors: left to the model to report
    assert np.array_equal(atoms_to_batch([co]).pos.numpy(), co.positions.astype(np.float32))
