"""Model files (eqv2/checkpoint.py): version 1 files without energy references, version 2 files with."""
from __future__ import annotations

import pytest
import torch

import eqv2
from eqv2.calculator import atoms_to_batch
from eqv2.checkpoint import Normalizers, read_model_file, save_model
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2

CFG = ModelConfig(num_layers=1, lmax=2, mmax=1, sphere_channels=8, attn_hidden_channels=8, attn_alpha_channels=4,
                  attn_value_channels=2, ffn_hidden_channels=8, edge_channels=8, num_heads=2)
NORMS = Normalizers(energy_mean=-0.7, energy_std=2.5, forces_std=0.3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EquiformerV2(CFG)


def test_a_file_without_references_is_version_1_as_before(model, tmp_path):
    save_model(tmp_path / "m.pt", model, CFG, NORMS)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["version"] == 1 and "energy_references" not in payload
    assert eqv2.load_model(tmp_path / "m.pt").energy_references is None
    assert read_model_file(tmp_path / "m.pt")[2] == NORMS  # training may start from it


def test_references_are_added_per_atom(model, tmp_path, oc20_atoms):
    refs = [0.01 * z for z in range(CFG.max_num_elements)]
    save_model(tmp_path / "m.pt", model, CFG, NORMS, energy_references=refs)
    assert torch.load(tmp_path / "m.pt", weights_only=True)["version"] == 2
    potential = eqv2.load_model(tmp_path / "m.pt")
    batch = atoms_to_batch([oc20_atoms, oc20_atoms[:5]])
    with torch.no_grad():
        out, raw = potential(batch), potential.model(batch)
    expected = raw["energy"].double() * 2.5 - 0.7 + torch.tensor([0.01 * oc20_atoms.numbers.sum(),
                                                                  0.01 * oc20_atoms.numbers[:5].sum()])
    torch.testing.assert_close(out["energy"].double(), expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out["forces"], raw["forces"] * 0.3)
    assert read_model_file(tmp_path / "m.pt")[4] == pytest.approx(refs)  # fine-tuning reads them


def test_bad_reference_tables_and_versions_are_named(model, tmp_path):
    with pytest.raises(ValueError, match="3 energy references for an element table of 90"):
        save_model(tmp_path / "m.pt", model, CFG, NORMS, energy_references=[0.0, 1.0, 2.0])
    save_model(tmp_path / "m.pt", model, CFG, NORMS)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    torch.save({**payload, "version": 3}, tmp_path / "v3.pt")
    with pytest.raises(ValueError, match="v3.pt: unsupported eqv2 checkpoint version 3"):
        eqv2.load_model(tmp_path / "v3.pt")
    torch.save({**payload, "energy_references": [0.0] * 90}, tmp_path / "v1refs.pt")
    with pytest.raises(ValueError, match="v1refs.pt: a version 1 model checkpoint cannot have energy_references"):
        eqv2.load_model(tmp_path / "v1refs.pt")


def test_exported_files_carry_the_paper_config_only(model, tmp_path):
    from eqv2.execution import EXECUTION_KEYS, ExecutionPlan, apply_plan
    apply_plan(model, ExecutionPlan(pad_atoms_multiple=64, pad_edges_multiple=1024, rotation_align=8,
                                    validate_inputs=False))
    save_model(tmp_path / "m.pt", model, CFG, NORMS)
    saved = torch.load(tmp_path / "m.pt", weights_only=True)["model_config"]
    assert not set(saved) & EXECUTION_KEYS, sorted(set(saved) & EXECUTION_KEYS)


def test_an_old_file_with_kernel_keys_loads_without_shape_buckets(model, tmp_path, oc20_atoms):
    """Files written before the execution plan hold kernel and padding keys (the calculator then padded every
    structure to 64 atoms / 1,024 edges): they load, the keys dropped, into the reference plan."""
    save_model(tmp_path / "new.pt", model, CFG, NORMS)
    payload = torch.load(tmp_path / "new.pt", weights_only=True)
    payload["model_config"].update(pad_atoms_multiple=64, pad_edges_multiple=1024, rotation_align=8,
                                   so2_fused_input_grad=True, so2_indexed_radial=True, fused_rotation=True,
                                   s2_kernel_form="rows", validate_inputs=False)
    torch.save(payload, tmp_path / "old.pt")
    old, new = eqv2.load_model(tmp_path / "old.pt"), eqv2.load_model(tmp_path / "new.pt")
    from eqv2.execution import REFERENCE
    assert old.model.plan == REFERENCE == new.model.plan  # no shape buckets, no kernels, inputs checked
    assert old.config == new.config
    batch = atoms_to_batch([oc20_atoms])
    torch.testing.assert_close(old(batch)["energy"], new(batch)["energy"], rtol=0, atol=0)
