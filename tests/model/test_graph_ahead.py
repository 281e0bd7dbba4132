"""Graphs built ahead of the model (GraphBuilder, in the data-loader workers): the model computes the
same function as with the graph it builds itself, stays equivariant, and refuses a graph built for
another cutoff; the builder makes the model's input checks and names the structure."""
from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from ase import Atoms

from eqv2.execution import ExecutionPlan, apply_plan
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from eqv2.model.graph import GraphBuilder, GraphInputError, graph_from_offsets, radius_graph_pbc
from tests.model.equivariance import batch_from_atoms, max_equivariance_error, random_rotations, rotate_batch
from tests.model.fairchem_reference import slab_structures

SMALL = dict(num_layers=2, lmax=3, mmax=2, sphere_channels=8, attn_hidden_channels=8, attn_alpha_channels=4,
             attn_value_channels=2, ffn_hidden_channels=8, edge_channels=8, num_heads=2, alpha_drop=0.0,
             drop_path_rate=0.0, max_radius=5.0, max_neighbors=12)


def _builder(cfg: ModelConfig) -> GraphBuilder:
    return GraphBuilder(cfg.max_radius, cfg.max_neighbors, cfg.max_num_elements)


def _outputs_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    pos = batch.pos.clone().requires_grad_(True)
    out = model(replace(batch, pos=pos))
    (out["energy"].pow(2).sum() + out["forces"].pow(2).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads, pos.grad


@pytest.mark.parametrize("pad", [(0, 0), (16, 64)])
def test_graph_built_ahead_gives_the_same_outputs_and_gradients(pad):
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL)
    model = apply_plan(EquiformerV2(cfg), ExecutionPlan(pad_atoms_multiple=pad[0], pad_edges_multiple=pad[1]))
    model = model.double().train()
    batch = batch_from_atoms(slab_structures(3, 3), torch.float64)
    ahead = _builder(cfg)(batch)
    assert ahead.edge_index.shape[1] > 0 and ahead.graph_spec == (5.0, 12, cfg.max_num_elements, True)
    ref, ref_grads, ref_pos_grad = _outputs_and_grads(model, batch)
    out, grads, pos_grad = _outputs_and_grads(model, ahead)
    for key in ("energy", "forces"):
        assert torch.equal(out[key], ref[key]), key
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name
    # the edge vectors are computed from the positions: they carry the positions' gradient the same way
    torch.testing.assert_close(pos_grad, ref_pos_grad, rtol=1e-12, atol=1e-14)


def test_edge_vectors_from_offsets_match_the_neighbour_search():
    batch = batch_from_atoms(slab_structures(2, 1), torch.float64)
    graph = radius_graph_pbc(batch.pos, batch.cell, batch.pbc, batch.natoms, 6.0, 30)
    again = graph_from_offsets(batch.pos, batch.cell, batch.batch, graph.edge_index, graph.cell_offset)
    assert torch.equal(again.edge_vec, graph.edge_vec) and torch.equal(again.distance, graph.distance)


def test_graph_built_ahead_is_equivariant_for_rotated_positions_and_cells():
    """The graph's integers are found once; positions and cells rotated afterwards (many rotations).
    Gate activations: exactly equivariant (the S2 grid ones are only up to the grid's resolution)."""
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL, activation="gate", use_grid_mlp=False)
    model = EquiformerV2(cfg).double().eval()
    batch = _builder(cfg)(batch_from_atoms(slab_structures(2, 2), torch.float64))
    err = max_equivariance_error(model, batch, random_rotations(16, seed=3))
    assert err["energy"] < 1e-9 and err["forces"] < 1e-9, err
    rotated = rotate_batch(batch, random_rotations(1, seed=4)[0])
    assert rotated.edge_index is batch.edge_index  # the rotation really reused the graph built ahead


def test_model_refuses_a_graph_built_for_another_cutoff():
    cfg = ModelConfig(**SMALL)
    batch = GraphBuilder(6.0, 12, cfg.max_num_elements)(batch_from_atoms(slab_structures(1, 1), torch.float64))
    with pytest.raises(ValueError, match=r"built for .*6\.0.*the model has .*5\.0"):
        EquiformerV2(cfg).double()(batch)


@pytest.mark.parametrize("structure, match", [
    (Atoms("Cu2", positions=[[0, 0, 0], [20, 0, 0]]), "no neighbour"),
    (Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 0]]), "coincide"),
    (Atoms("CuU", positions=[[0, 0, 0], [2, 0, 0]]), "atomic number 92"),
    (Atoms("Cu2", positions=[[0, 0, 0], [np.nan, 0, 0]]), "non-finite"),
])
def test_builder_makes_the_model_checks_and_names_the_structure(structure, match):
    batch = batch_from_atoms([Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]]), structure], torch.float32)
    batch.ids = ["fine", "bad_sid_7"]
    with pytest.raises(GraphInputError, match=match) as info:
        GraphBuilder(5.0, 12, 90)(batch)
    assert "bad_sid_7" in str(info.value)


def test_builder_survives_pickling_for_worker_processes():
    builder = pickle.loads(pickle.dumps(GraphBuilder(12.0, 20, 90)))
    batch = builder(batch_from_atoms(slab_structures(1, 1), torch.float32))
    assert batch.graph_spec == (12.0, 20, 90, True) and batch.cell_offset.dtype == torch.int64
