"""Shape buckets: padding the graph with an inert dummy structure changes no output or gradient."""
from __future__ import annotations

import pytest
import torch

from eqv2.execution import ExecutionOverrides, ExecutionPlan, apply_plan, choose_plan
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from eqv2.model.graph import pad_graph, radius_graph_pbc
from tests.model.equivariance import batch_from_atoms
from tests.model.fairchem_reference import slab_structures

SMALL = dict(num_layers=2, lmax=3, mmax=2, sphere_channels=8, attn_hidden_channels=8, attn_alpha_channels=4,
             attn_value_channels=2, ffn_hidden_channels=8, edge_channels=8, num_heads=2, alpha_drop=0.0,
             drop_path_rate=0.0, max_radius=5.0, max_neighbors=12)


def _run(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch)
    (out["energy"].pow(2).sum() + out["forces"].pow(2).sum()).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("atoms_multiple, edges_multiple", [(16, 64), (7, 0), (0, 13), (1, 1)])
def test_padded_model_computes_the_same_function(atoms_multiple, edges_multiple):
    torch.manual_seed(0)
    plain = EquiformerV2(ModelConfig(**SMALL)).double().train()
    padded = apply_plan(EquiformerV2(ModelConfig(**SMALL)), ExecutionPlan(pad_atoms_multiple=atoms_multiple,
                                                                          pad_edges_multiple=edges_multiple))
    padded = padded.double().train()
    padded.load_state_dict(plain.state_dict())
    seen = []
    padded.blocks[0].register_forward_hook(lambda m, args, out: seen.append((args[0].shape[0], args[3].shape[1])))
    batch = batch_from_atoms(slab_structures(3, 3), torch.float64)
    ref, ref_grads = _run(plain, batch)
    out, grads = _run(padded, batch)
    assert out["energy"].shape == ref["energy"].shape and out["forces"].shape == ref["forces"].shape
    torch.testing.assert_close(out["energy"], ref["energy"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["forces"], ref["forces"], rtol=1e-10, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)
    num_atoms, num_edges = seen[0]
    assert num_atoms > batch.pos.shape[0] and num_atoms % max(atoms_multiple, 1) == 0
    assert num_edges % max(edges_multiple, 1) == 0


def test_pad_graph_appends_self_loops_of_the_first_padding_atom():
    batch = batch_from_atoms(slab_structures(1, 2), torch.float64)
    graph = radius_graph_pbc(batch.pos, batch.cell, batch.pbc, batch.natoms, 5.0, 12)
    n, e = batch.pos.shape[0], graph.edge_index.shape[1]
    padded, pad_atoms = pad_graph(graph, n, 32, 100, 2.5)
    assert (n + pad_atoms) % 32 == 0 and pad_atoms >= 1
    assert padded.edge_index.shape[1] % 100 == 0 and padded.edge_index.shape[1] > e
    assert torch.equal(padded.edge_index[:, :e], graph.edge_index)
    assert (padded.edge_index[:, e:] == n).all()
    assert torch.equal(padded.distance[e:], torch.full_like(padded.distance[e:], 2.5))
    assert torch.allclose(padded.edge_vec[e:].norm(dim=1), padded.distance[e:])


def test_negative_padding_multiple_is_rejected():
    with pytest.raises(ValueError, match="execution.pad_edges_multiple must be >= 0"):
        choose_plan(device_type="cpu", dtype="fp32", lmax=3, mmax=2,
                    overrides=ExecutionOverrides(pad_edges_multiple=-1))
    with pytest.raises(ValueError, match="execution.pad_edges_multiple must be >= 0"):
        apply_plan(EquiformerV2(ModelConfig(**SMALL)), ExecutionPlan(pad_edges_multiple=-1))
