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
