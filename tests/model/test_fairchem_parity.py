"""Parity with the reference implementation (fairchem-core 1.10.0) for the same weights.

Needs `pip install --no-deps fairchem-core==1.10.0` and huggingface_hub (`make test` installs both; `make demo` neither).
"""
from __future__ import annotations

import ase.io
import pytest
import torch

from eqv2.checkpoint import load_model
from eqv2.fairchem_compat import convert_state_dict, use_fairchem_numerics
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2, count_parameters
from eqv2.model.graph import radius_graph_pbc
from tests.model.equivariance import batch_from_atoms

fr = pytest.importorskip("tests.model.fairchem_reference")
try:
    LEGACY, HYDRA = fr.import_fairchem()
except ImportError as err:  # pragma: no cover - CI installs fairchem-core
    pytest.skip(f"fairchem-core 1.10.0 not importable: {err}", allow_module_level=True)

SMALL = dict(num_layers=2, sphere_channels=16, attn_hidden_channels=16, attn_alpha_channels=8,
             attn_value_channels=4, ffn_hidden_channels=16, edge_channels=16, num_heads=2,
             alpha_drop=0.0, drop_path_rate=0.0)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.detach() - ref.detach()).norm() / ref.detach().norm())


@pytest.fixture(scope="module")
def structures(oc20_atoms):
    return [oc20_atoms] + fr.slab_structures(seed=0, count=3)


def reference_outputs(ref_model, batch, cfg, hydra_heads=None):
    graph = radius_graph_pbc(batch.pos, batch.cell, batch.pbc, batch.natoms, cfg.max_radius, cfg.max_neighbors)
    data = fr.pyg_batch(batch, graph)
    with fr.deterministic_frames(LEGACY, HYDRA), torch.no_grad():
        if hydra_heads is None:
            out = ref_model(data)
            return out["energy"].reshape(-1), out["forces"]
        emb = ref_model(data)
        return hydra_heads[0](data, emb)["energy"].reshape(-1), hydra_heads[1](data, emb)["forces"]


@pytest.mark.parametrize(
    "variant",
    [
        dict(lmax=4, mmax=2),
        dict(lmax=6, mmax=3),
        dict(lmax=4, mmax=2, norm_type="rms_norm_sh"),
        dict(lmax=3, mmax=1, norm_type="layer_norm", activation="gate", use_grid_mlp=False),
        dict(lmax=3, mmax=2, activation="s2", use_grid_mlp=False, use_attn_renorm=False),
    ],
    ids=["L4M2", "L6M3", "rms_norm", "ln_gate", "s2_no_renorm"],
)
def test_same_weights_same_outputs(variant, structures):
    cfg = ModelConfig(**{**SMALL, **variant})
    torch.manual_seed(0)
    ref = LEGACY.EquiformerV2(**fr.fairchem_hparams(cfg)).eval()
    fr.perturb_(ref, seed=1)
    ours = EquiformerV2(cfg).eval()
    use_fairchem_numerics(ours)  # as conversion: fairchem's float32-built constants
    ours.load_state_dict(convert_state_dict(ref.state_dict(), ours.state_dict()))
    batch = batch_from_atoms(structures, torch.float32)
    ref_e, ref_f = reference_outputs(ref, batch, cfg)
    with torch.no_grad():
        out = ours(batch)
    assert rel_err(out["energy"], ref_e) <= 1e-5
    assert rel_err(out["forces"], ref_f) <= 1e-5
    # per-structure energies, not just the batch as a whole
    assert torch.allclose(out["energy"], ref_e, rtol=1e-4, atol=1e-6)


def _fairchem_checkpoint(model_config, state_dict, ema=None):
    return {
        "config": {"model": model_config, "dataset": {"train": {"normalize_labels": True, "target_mean": -0.75,
                                                                 "target_std": 2.9, "grad_target_std": 2.9}}},
        "state_dict": state_dict, "ema": ema, "step": 123,
    }


def test_convert_hydra_layout_checkpoint_end_to_end(tmp_path, structures):
    """backbone+heads layout with `module.` prefixes, through the CLI tool, to a loaded Potential."""
    cfg = ModelConfig(**{**SMALL, "lmax": 4, "mmax": 2})
    hp = fr.fairchem_hparams(cfg)
    torch.manual_seed(0)
    backbone = HYDRA.EquiformerV2Backbone(**hp).eval()
    energy_head, force_head = HYDRA.EquiformerV2EnergyHead(backbone).eval(), HYDRA.EquiformerV2ForceHead(backbone).eval()
    for i, m in enumerate((backbone, energy_head, force_head)):
        fr.perturb_(m, seed=10 + i)
    sd = {f"module.backbone.{k}": v for k, v in backbone.state_dict().items()}
    sd.update({f"module.output_heads.energy.{k}": v for k, v in energy_head.state_dict().items()})
    sd.update({f"module.output_heads.forces.{k}": v for k, v in force_head.state_dict().items()})
    model_cfg = {"name": "hydra", "backbone": {**hp, "model": "equiformer_v2_backbone"},
                 "heads": {"energy": {"module": "equiformer_v2_energy_head"},
                           "forces": {"module": "equiformer_v2_force_head"}}}
    src, dst = tmp_path / "fairchem.pt", tmp_path / "eqv2.pt"
    torch.save(_fairchem_checkpoint(model_cfg, sd), src)
    from eqv2.tools.convert import main

    assert main([str(src), str(dst)]) == 0
    potential = load_model(dst)
    batch = batch_from_atoms(structures, torch.float32)
    ref_e, ref_f = reference_outputs(backbone, batch, cfg, hydra_heads=(energy_head, force_head))
    with torch.no_grad():
        out = potential(batch)
    assert rel_err(out["energy"], ref_e * 2.9 - 0.75) <= 1e-5
    assert rel_err(out["forces"], ref_f * 2.9) <= 1e-5


def test_convert_legacy_checkpoint_uses_ema_weights(tmp_path, structures):
    cfg = ModelConfig(**{**SMALL, "lmax": 3, "mmax": 2})
    hp = fr.fairchem_hparams(cfg)
    torch.manual_seed(0)
    ref = LEGACY.EquiformerV2(**hp).eval()
    raw = {f"module.{k}": v.clone() for k, v in ref.state_dict().items()}
    fr.perturb_(ref, seed=3)  # the EMA differs from the raw weights
    ema = {"decay": 0.999, "num_updates": 5, "shadow_params": [p.detach().clone() for p in ref.parameters()]}
    src, dst = tmp_path / "legacy.pt", tmp_path / "eqv2.pt"
    torch.save(_fairchem_checkpoint("equiformer_v2", raw, ema) | {"config": {
        "model": "equiformer_v2", "model_attributes": hp,
        "dataset": [{"normalize_labels": True, "target_mean": 0.0, "target_std": 1.0}]}}, src)
    from eqv2.tools.convert import main

    assert main([str(src), str(dst)]) == 0
    potential = load_model(dst)
    assert potential.meta["weights"] == "ema"
    batch = batch_from_atoms(structures, torch.float32)
    ref_e, ref_f = reference_outputs(ref, batch, cfg)
    with torch.no_grad():
        out = potential(batch)
    assert rel_err(out["energy"], ref_e) <= 1e-5 and rel_err(out["forces"], ref_f) <= 1e-5


def test_published_153M_reference_converts():
    """The 153M All+MD hyperparameters (official config) build in fairchem and convert exactly."""
    hp = dict(use_pbc=True, regress_forces=True, otf_graph=True, max_neighbors=20, max_radius=12.0,
              max_num_elements=90, num_layers=20, sphere_channels=128, attn_hidden_channels=64, num_heads=8,
              attn_alpha_channels=64, attn_value_channels=16, ffn_hidden_channels=128, norm_type="layer_norm_sh",
              lmax_list=[6], mmax_list=[3], grid_resolution=18, num_sphere_samples=128, edge_channels=128,
              use_atom_edge_embedding=True, share_atom_edge_embedding=False, distance_function="gaussian",
              num_distance_basis=512, attn_activation="silu", use_s2_act_attn=False, use_attn_renorm=True,
              ffn_activation="silu", use_gate_act=False, use_grid_mlp=True, use_sep_s2_act=True, alpha_drop=0.1,
              drop_path_rate=0.1, proj_drop=0.0, weight_init="uniform")
    from eqv2.fairchem_compat import model_config_from_fairchem
    from eqv2.config import from_dict, load_yaml
    from pathlib import Path

    cfg = model_config_from_fairchem({"name": "equiformer_v2", **hp})
    published = from_dict(ModelConfig, load_yaml(Path(__file__).parents[2] / "configs/model/eqv2_153M.yaml"))
    assert cfg == published
    ref = LEGACY.EquiformerV2(**hp)
    ours = EquiformerV2(cfg)
    ours.load_state_dict(convert_state_dict(ref.state_dict(), ours.state_dict()))
    assert count_parameters(ours) == count_parameters(ref) == 153_602_690
