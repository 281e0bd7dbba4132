"""load_model, the ASE calculator and `python -m eqv2.predict`."""
from __future__ import annotations

import subprocess
import sys

import ase.io
import numpy as np
import pytest
import torch

import eqv2
from eqv2.calculator import EquiformerV2Calculator
from eqv2.checkpoint import Normalizers, save_model
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from eqv2.predict import main as predict_main
from tests.conftest import OC20_JSON
from tests.model.fairchem_reference import slab_structures

CFG = ModelConfig(num_layers=1, lmax=2, mmax=1, sphere_channels=8, attn_hidden_channels=8, attn_alpha_channels=4,
                  attn_value_channels=2, ffn_hidden_channels=8, edge_channels=8, num_heads=2)
NORMS = Normalizers(energy_mean=-0.7, energy_std=2.5, forces_std=0.3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_model(path, EquiformerV2(CFG), CFG, NORMS, meta={"note": "test"})
    return path


def test_load_model_denormalises(checkpoint, oc20_atoms):
    from eqv2.calculator import atoms_to_batch

    potential = eqv2.load_model(checkpoint)
    assert not potential.training and potential.config == CFG and potential.meta == {"note": "test"}
    batch = atoms_to_batch([oc20_atoms])
    raw = potential.model(batch)
    out = potential(batch)
    assert torch.allclose(out["energy"], raw["energy"] * 2.5 - 0.7)
    assert torch.allclose(out["forces"], raw["forces"] * 0.3)


def test_calculator_energy_forces(checkpoint, oc20_atoms):
    atoms = oc20_atoms.copy()
    atoms.calc = EquiformerV2Calculator(checkpoint, device="cpu")
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    assert isinstance(energy, float) and forces.shape == (len(atoms), 3) and np.isfinite(forces).all()
    atoms.rotate(33, "z", rotate_cell=True)  # properties follow the structure
    assert abs(atoms.get_potential_energy() - energy) < 1e-3


def test_predict_cli_all_frames(checkpoint, oc20_atoms, tmp_path):
    frames = [oc20_atoms] + slab_structures(seed=1, count=3)
    src = tmp_path / "frames.extxyz"
    ase.io.write(src, frames)
    out = tmp_path / "pred.npz"
    assert predict_main(["--checkpoint", str(checkpoint), "--input", str(src), "--output", str(out),
                         "--device", "cpu", "--max-atoms", "60"]) == 0
    result = np.load(out)
    assert result["energy"].shape == (4,) and list(result["natoms"]) == [len(f) for f in frames]
    assert result["forces"].shape == (sum(len(f) for f in frames), 3)
    calc = EquiformerV2Calculator(checkpoint, device="cpu")
    frames[2].calc = calc
    assert abs(frames[2].get_potential_energy() - result["energy"][2]) < 1e-4
    start = len(frames[0]) + len(frames[1])
    assert np.allclose(frames[2].get_forces(), result["forces"][start:start + len(frames[2])], atol=1e-5)


def test_predict_reads_ase_json_db_and_reports_bad_input(checkpoint, tmp_path):
    out = tmp_path / "p.npz"
    proc = subprocess.run([sys.executable, "-m", "eqv2.predict", "--checkpoint", str(checkpoint), "--input",
                           str(OC20_JSON), "--output", str(out), "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert np.load(out)["energy"].shape == (1,)
    assert predict_main(["--checkpoint", str(checkpoint), "--input", str(tmp_path / "missing.xyz"),
                         "--output", str(out)]) == 2
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        eqv2.load_model(tmp_path / "garbage.pt")


@pytest.mark.parametrize("threads, inside", [(1, 1), (None, 2)])
def test_calculator_threads_apply_during_the_calculation_only(checkpoint, oc20_atoms, threads, inside):
    seen = []
    calc = EquiformerV2Calculator(checkpoint, device="cpu", threads=threads)
    calc.potential.model.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        atoms = oc20_atoms.copy()
        atoms.calc = calc
        energy = atoms.get_potential_energy()
        assert seen == [inside] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    reference = oc20_atoms.copy()
    reference.calc = EquiformerV2Calculator(checkpoint, device="cpu", threads=2)
    assert abs(reference.get_potential_energy() - energy) < 1e-5
    with pytest.raises(ValueError, match="threads must be >= 1"):
        EquiformerV2Calculator(checkpoint, device="cpu", threads=0)
