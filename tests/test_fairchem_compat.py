"""Reading fairchem EquiformerV2 hyperparameters (eqv2/fairchem_compat.py): what converts to what."""
from __future__ import annotations

import pytest

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
