"""eqv2/buckets.py and the bucket a batch carries (eqv2/batch.py): shapes as the plan says, the dummy structure,
the batch's model inputs as views of the bucket's through moving and pickling, a stale bucket dropped."""
from __future__ import annotations

import copy
import pickle
from dataclasses import replace

import pytest
import torch

from eqv2.buckets import bucket_shape, fits, loader_prepare, pad_to_bucket
from eqv2.execution import REFERENCE, ExecutionPlan
from eqv2.model.graph import GraphBuilder, graph_from_offsets
from tests.model.equivariance import batch_from_atoms
from tests.model.fairchem_reference import slab_structures

GRAPHS = GraphBuilder(5.0, 12, 90)


def _batch():
    return GRAPHS(batch_from_atoms(slab_structures(1, 2), torch.float64))


@pytest.mark.parametrize("atoms_multiple, edges_multiple", [(32, 100), (0, 0), (7, 1)])
def test_bucket_has_the_plans_shape_and_an_inert_dummy_structure(atoms_multiple, edges_multiple):
    batch = _batch()
    n, b, e = batch.pos.shape[0], batch.num_graphs, batch.edge_index.shape[1]
    padded = pad_to_bucket(batch, atoms_multiple, edges_multiple)
    bucket = padded.bucket
    atoms, edges = bucket.pos.shape[0], bucket.edge_index.shape[1]
    assert (atoms, edges) == bucket_shape(n, e, atoms_multiple, edges_multiple)
    assert atoms % max(atoms_multiple, 1) == 0 and edges % max(edges_multiple, 1) == 0 and atoms > n and edges > e
    assert bucket.padding == atoms - n and bucket.num_graphs == b + 1 and int(bucket.natoms[-1]) == atoms - n
    assert torch.equal(bucket.batch[n:], torch.full((atoms - n,), b)) and (bucket.atomic_numbers[n:] == 1).all()
    assert torch.equal(bucket.edge_index[:, :e], batch.edge_index) and (bucket.edge_index[:, e:] == n).all()
    # every padding edge: the first padding atom to its image one cell up, (0, 0, max_radius / 2)
    graph = graph_from_offsets(bucket.pos, bucket.cell, bucket.batch, bucket.edge_index, bucket.cell_offset)
    assert torch.equal(graph.edge_vec[e:], torch.tensor([[0.0, 0.0, 2.5]], dtype=torch.float64).expand(edges - e, 3))
    assert torch.equal(graph.edge_vec[:e], graph_from_offsets(batch.pos, batch.cell, batch.batch, batch.edge_index,
                                                              batch.cell_offset).edge_vec)
    assert fits(padded, atoms_multiple, edges_multiple) and not fits(padded, atoms_multiple + 64, edges_multiple)
    assert padded.ids == batch.ids and bucket.ids == [*batch.ids, "padding"]


def test_model_inputs_are_views_of_the_bucket_through_moving_and_pickling():
    padded = pad_to_bucket(replace(_batch(), energy=torch.zeros(2)), 16, 64)
    assert padded.pos.data_ptr() == padded.bucket.pos.data_ptr() and padded.pos.shape[0] < padded.bucket.pos.shape[0]
    for again in (pickle.loads(pickle.dumps(padded)), copy.deepcopy(padded), padded.to("cpu")):
        assert again.bucket is not None and again._views_of(again.bucket)
        assert again.edge_index.data_ptr() == again.bucket.edge_index.data_ptr()
        assert torch.equal(again.pos, padded.pos) and torch.equal(again.energy, padded.energy)
    meta = padded.to("meta")
    assert meta.bucket.pos.device.type == "meta" and meta.pos.shape == padded.pos.shape


def test_a_batch_given_other_model_inputs_drops_its_stale_bucket():
    padded = pad_to_bucket(_batch(), 16, 64)
    assert replace(padded, energy=torch.zeros(2)).bucket is padded.bucket  # a target: the bucket still holds
    assert replace(padded, pos=padded.pos + 0.1).bucket is None
    assert replace(padded, cell=padded.cell.clone()).bucket is None


def test_padding_needs_the_graph_and_the_loader_pads_only_under_buckets():
    with pytest.raises(ValueError, match="no radius graph"):
        pad_to_bucket(batch_from_atoms(slab_structures(1, 1)), 16, 64)
    assert loader_prepare(GRAPHS, REFERENCE) is GRAPHS and loader_prepare(None, ExecutionPlan(pad_atoms_multiple=8)) is None
    prepare = pickle.loads(pickle.dumps(loader_prepare(GRAPHS, ExecutionPlan(pad_atoms_multiple=8))))
    batch = prepare(batch_from_atoms(slab_structures(1, 1), torch.float32))
    assert batch.bucket.pos.shape[0] % 8 == 0 and batch.graph_spec == GRAPHS.spec
