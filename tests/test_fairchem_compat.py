"""Reading fairchem EquiformerV2 hyperparameters (eqv2/fairchem_compat.py): what converts to what."""
from __future__ import annotations

import pytest
import torch

from eqv2.fairchem_compat import model_config_from_fairchem

BASE = dict(name="equiformer_v2", use_pbc=True, regress_forces=True, otf_graph=True, max_neighbors=20,
            max_radius=12.0, num_layers=2, lmax_list=[4], mmax_list=[2])


@pytest.mark.parametrize("value", [True, False])
def test_neighbour_selection_mode_converts(value):
    """enforce_max_neighbors_strictly changes the graph, so the function: it is read, not ignored."""
    assert model_config_from_fairchem({**BASE, "enforce_max_neighbors_strictly": value}).enforce_max_neighbors_strictly is value


def test_neighbour_selection_defaults_to_strict_as_fairchem():
    assert model_config_from_fairchem(BASE).enforce_max_neighbors_strictly is True
    hydra = {"name": "hydra", "backbone": {**BASE, "model": "equiformer_v2_backbone",
                                           "enforce_max_neighbors_strictly": False},
             "heads": {"energy": {"module": "equiformer_v2_energy_head"}}}
    assert model_config_from_fairchem(hydra).enforce_max_neighbors_strictly is False


def _checkpoint(**extra):
    return {"config": {"model": "equiformer_v2", "model_attributes": dict(BASE),
                       "dataset": [{"normalize_labels": True, "target_mean": 0.0, "target_std": 1.0}]},
            "state_dict": {}, **extra}


@pytest.mark.parametrize("change, match", [
    (lambda c: c["config"]["dataset"][0].update(transforms={"element_references": {"energy": {"file": "refs.pt"}}}),
     "transforms.element_references but the checkpoint stores no elementrefs"),
    (lambda c: c.update(elementrefs={"forces": {"element_references": torch.zeros(119)}}),
     r"element references for \['forces'\] are not supported"),
    (lambda c: c.update(elementrefs={"energy": {"element_references": torch.eye(119)[100]}}),
     "non-zero reference for atomic number 100, beyond the model's element table"),
    (lambda c: c["config"]["model_attributes"].update(load_energy_lin_ref=True, use_energy_lin_ref=True),
     "load_energy_lin_ref is set but the checkpoint has no energy_lin_ref parameter"),
])
def test_energy_references_that_cannot_be_converted_are_named(change, match):
    from eqv2.fairchem_compat import convert_checkpoint

    checkpoint = _checkpoint()
    change(checkpoint)
    with pytest.raises(ValueError, match=match):
        convert_checkpoint(checkpoint)


def _hydra(backbone=None, heads=None, **top):
    return {"name": "hydra", "backbone": {**BASE, "model": "equiformer_v2_backbone", **(backbone or {})},
            "heads": heads if heads is not None else {"energy": {"module": "equiformer_v2_energy_head"},
                                                      "forces": {"module": "equiformer_v2_force_head"}}, **top}


@pytest.mark.parametrize("heads, forces", [
    ({"energy": {"module": "equiformerV2_scalar_head", "reduce": "sum", "output_name": "energy"},
      "forces": {"module": "equiformerV2_vector_head", "output_name": "forces"}}, True),
    ({"e": {"module": "equiformer_v2_energy_head"}}, False),  # energy only (IS2RE-style)
])
def test_hydra_heads_that_convert(heads, forces):
    cfg = model_config_from_fairchem(_hydra(heads=heads, otf_graph=True, freeze_backbone=False))
    assert cfg.regress_forces is forces


# every fairchem EquiformerV2 family and option eqv2 does not convert (docs/fairchem.md), with the error
# naming it
REFUSED = {
    "dens_option": (_hydra(backbone={"model": "equiformer_v2_dens_backbone", "use_force_encoding": "yes"}),
                    "DeNS backbone option use_force_encoding must be true or false"),
    "other_backbone": (_hydra(backbone={"model": "escn_backbone"}), "hydra backbone 'escn_backbone' is not an Equi"),
    "stress_other_output": (_hydra(heads={"energy": {"module": "equiformer_v2_energy_head"},
                                          "s": {"module": "rank2_symmetric_head", "output_name": "dielectric"}}),
                            "head 's': option output_name='dielectric' is not supported"),
    "two_stress_heads": (_hydra(heads={"energy": {"module": "equiformer_v2_energy_head"},
                                       "a": {"module": "rank2_symmetric_head"},
                                       "b": {"module": "dens_rank2_symmetric_head"}}),
                         r"stress heads \['a', 'b'\]"),
    "stress_head_option": (_hydra(heads={"energy": {"module": "equiformer_v2_energy_head"},
                                         "stress": {"module": "rank2_symmetric_head", "use_denoising": True}}),
                           "head 'stress' .*unknown option 'use_denoising'"),
    "other_head_module": (_hydra(heads={"energy": {"module": "escn_energy_head"}}),
                          "head 'energy': module 'escn_energy_head' is not an EquiformerV2 head"),
    "other_reduce": (_hydra(heads={"energy": {"module": "equiformerV2_scalar_head", "reduce": "max"}}),
                     "option reduce='max' is not supported"),
    "scalar_head_other_output": (_hydra(heads={"gap": {"module": "equiformerV2_scalar_head", "output_name": "gap"}}),
                                 "option output_name='gap' is not supported"),
    "unknown_head_option": (_hydra(heads={"energy": {"module": "equiformer_v2_energy_head", "scale": 2}}),
                            "unknown option 'scale'"),
    "two_energy_heads": (_hydra(heads={"a": {"module": "equiformer_v2_energy_head"},
                                       "b": {"module": "equiformerV2_scalar_head"}}),
                         r"one energy head.* energy heads \['a', 'b'\]"),
    "no_heads": (_hydra(heads={}, finetune_config={"starting_checkpoint": "x.pt"}), "lacks its backbone or heads"),
    "unknown_hydra_option": (_hydra(some_switch=True), r"unknown fairchem hydra option\(s\) \['some_switch'\]"),
    "no_pbc": ({**BASE, "use_pbc": False}, "use_pbc=False is not supported"),
    "shared_edge_embedding": ({**BASE, "share_atom_edge_embedding": True}, "share_atom_edge_embedding=True"),
    "m_shared_radial": ({**BASE, "use_m_share_rad": True}, "use_m_share_rad=True"),
    "s2_attention": ({**BASE, "use_s2_act_attn": True}, "use_s2_act_attn=True"),
    "distance_function": ({**BASE, "distance_function": "sigmoid"}, "distance_function='sigmoid'"),
    "several_resolutions": ({**BASE, "lmax_list": [4, 6], "mmax_list": [2, 2]}, "lmax_list=.*several resolutions"),
    "unknown_option": ({**BASE, "use_force_encoding": True}, r"unknown fairchem EquiformerV2 option\(s\) \['use_force"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_is_not_converted_is_refused_naming_it(name):
    hparams, match = REFUSED[name]
    with pytest.raises(ValueError, match=match):
        model_config_from_fairchem(hparams)


@pytest.mark.parametrize("model, match", [
    ({"name": "equiformer_v2_dens_backbone"}, "model 'equiformer_v2_dens_backbone' .*DeNS backbone, which converts only"),
    ({"name": "gemnet_oc"}, "checkpoint model is 'gemnet_oc', not an EquiformerV2"),
    ("escn", "checkpoint model is 'escn', not equiformer_v2"),
])
def test_other_models_are_refused_naming_them(model, match):
    from eqv2.fairchem_compat import convert_checkpoint

    with pytest.raises(ValueError, match=match):
        convert_checkpoint({"config": {"model": model, "model_attributes": dict(BASE)}, "state_dict": {}})


def test_a_force_normalizer_with_a_mean_is_refused():
    from eqv2.fairchem_compat import normalizers_from_checkpoint

    norms = {"energy": {"mean": torch.tensor(0.1), "rmsd": torch.tensor(2.0)},
             "forces": {"mean": torch.tensor(0.5), "rmsd": torch.tensor(1.0)}}
    with pytest.raises(ValueError, match="forces normalizer has a non-zero mean 0.5"):
        normalizers_from_checkpoint({"normalizers": norms})
    norms["forces"]["mean"] = torch.tensor(0.0)
    assert normalizers_from_checkpoint({"normalizers": norms}) == {"energy_mean": pytest.approx(0.1),
                                                                   "energy_std": 2.0, "forces_std": 1.0}


def test_the_converter_tool_refuses_with_one_line_and_exit_2(tmp_path, capsys):
    from eqv2.tools.convert import main

    src = tmp_path / "omat.pt"
    heads = {"energy": {"module": "equiformer_v2_energy_head"}, "stress": {"module": "rank2_symmetric_head",
                                                                        "decompose": True}}
    outputs = {"stress": {"decomposition": {"stress_isotropic": {"irrep_dim": 0}, "stress_traceless": {"irrep_dim": 2}}}}
    torch.save({"config": {"model": _hydra(heads=heads), "outputs": outputs}, "state_dict": {}}, src)
    assert main([str(src), str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "omat.pt" in err and "outputs.stress.decomposition" in err
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("module", ["eqV2_DeNS_scalar_head", "fairchem.core.models.equiformer_v2.equiformer_v2_dens."
                                                             "DeNSScalarHead"])
def test_dens_and_stress_heads_convert_by_registry_name_or_class_path(module):
    heads = {"energy": {"module": module, "use_denoising": True, "reduce": "mean"},
             "forces": {"module": "eqV2_DeNS_vector_head"},
             "stress": {"module": "dens_rank2_symmetric_head", "output_name": "stress", "decompose": True,
                        "use_source_target_embedding": True, "use_denoising": False}}
    cfg = model_config_from_fairchem(_hydra(backbone={"model": "equiformer_v2_dens_backbone", "use_force_encoding": True},
                                            heads=heads))
    assert cfg.regress_forces and cfg.energy_reduce == "mean"
    assert cfg.stress_head.decompose and cfg.stress_head.use_source_target_embedding
    assert not cfg.stress_head.edge_level_mlp and not cfg.stress_head.extensive


def test_stress_normalizers_are_read_and_an_absent_energy_normalizer_is_the_identity():
    from eqv2.fairchem_compat import normalizers_from_checkpoint

    norms = {"forces": {"mean": torch.tensor(0.0), "rmsd": torch.tensor(0.7)},
             "stress_isotropic": {"mean": torch.tensor(0.01), "rmsd": torch.tensor(0.05)},
             "stress_anisotropic": {"mean": torch.tensor(0.0), "rmsd": torch.tensor(0.02)}}
    got = normalizers_from_checkpoint({"normalizers": norms})
    assert got["energy_mean"] == 0.0 and got["energy_std"] == 1.0 and got["forces_std"] == pytest.approx(0.7)
    assert got["stress"] == pytest.approx({"isotropic_mean": 0.01, "isotropic_std": 0.05, "anisotropic_mean": 0.0,
                                           "anisotropic_std": 0.02})
    norms["stress_anisotropic"]["rmsd"] = torch.ones(5)
    with pytest.raises(ValueError, match=r"stress_anisotropic normalizer has a \(5,\) tensor"):
        normalizers_from_checkpoint({"normalizers": norms})
