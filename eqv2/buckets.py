"""Shape buckets: each batch padded with an inert dummy structure to the execution plan's multiples of atoms
and edges (`ExecutionPlan.pad_atoms_multiple` / `pad_edges_multiple`), so that compiled code and CUDA graphs
(compile.mode reduce-overhead / max-autotune: one recording per shape) meet few distinct shapes.

The padding is no part of the model (eqv2/model/ computes the paper's function of whatever batch it is
given); it is made where batches are built:
- the trainer's loader (`data.build_graphs`): `loader_prepare(graphs, plan)` is what its workers run on each
  collated batch, the radius graph (GraphBuilder) and then `pad_to_bucket`, so the main process does no
  padding work;
- anywhere else (a model searching its own graph, the ASE calculator, relaxations, evaluation):
  `apply_plan` installs `install_bucket_hooks` on the model, forward hooks that run it on the batch's bucket
  (built there if the batch has none) and narrow its outputs back to the real structures.  Hooks, not a
  wrapper module: parameter names and the state dict stay those of the paper model, and every caller of
  `apply_plan(model, plan)` still gets outputs for its structures only.

The dummy structure (`pad_to_bucket`) holds every padding atom (hydrogen, at its origin) in a cubic periodic
cell of side d = max_radius / 2; every padding edge is a self-loop of its first atom to its periodic image
one cell up (cell offset (0, 0, 1)), so its edge vector is (0, 0, d), computed from the positions and cell
like every other edge.  No real atom sends or receives a padding message, so the real structures' outputs
and gradients are those of the unpadded batch.
"""
from __future__ import annotations

import functools
from dataclasses import replace
from typing import Callable

import torch
from torch import nn

from eqv2.batch import AtomsBatch
from eqv2.model.graph import GraphBuilder, search_graph
from eqv2.model.so3 import full_precision

# outputs with one row per atom; every other output has one row per structure
PER_ATOM_OUTPUTS = frozenset({"forces"})


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def bucket_shape(num_atoms: int, num_edges: int, atoms_multiple: int, edges_multiple: int) -> tuple[int, int]:
    """(atoms, edges) of a batch with `num_atoms` atoms and `num_edges` edges once padded to its bucket: each
    count plus at least one (the dummy structure has an atom and an edge), rounded up to its multiple (a
    multiple of 1 when 0)."""
    return _round_up(num_atoms + 1, max(atoms_multiple, 1)), _round_up(num_edges + 1, max(edges_multiple, 1))


def pad_to_bucket(batch: AtomsBatch, atoms_multiple: int, edges_multiple: int) -> AtomsBatch:
    """`batch` (with its radius graph, GraphBuilder) carrying its bucket: its structures followed by the inert
    dummy structure (module docstring), `bucket_shape` atoms and edges.  No host synchronisation (only
    shapes are read), so it also runs on the device."""
    if batch.edge_index is None or batch.graph_spec is None:
        raise ValueError("pad_to_bucket: the batch has no radius graph (build it first: GraphBuilder)")
    num_atoms, num_graphs, num_edges = batch.pos.shape[0], batch.num_graphs, batch.edge_index.shape[1]
    atoms, edges = bucket_shape(num_atoms, num_edges, atoms_multiple, edges_multiple)
    pad_atoms, pad_edges = atoms - num_atoms, edges - num_edges
    side = batch.graph_spec[0] / 2
    cell, offset = batch.cell, batch.cell_offset
    dummy_cell = side * torch.eye(3, dtype=cell.dtype, device=cell.device)  # [3, 3]
    up = torch.cat([offset.new_zeros(pad_edges, 2), offset.new_ones(pad_edges, 1)], dim=1)  # [Q, 3] (0, 0, 1)
    bucket = AtomsBatch(
        pos=torch.cat([batch.pos, batch.pos.new_zeros(pad_atoms, 3)]),
        atomic_numbers=torch.cat([batch.atomic_numbers, batch.atomic_numbers.new_ones(pad_atoms)]),
        cell=torch.cat([cell, dummy_cell[None]]),
        pbc=torch.cat([batch.pbc, batch.pbc.new_ones(1, 3)]),
        natoms=torch.cat([batch.natoms, batch.natoms.new_full((1,), pad_atoms)]),
        batch=torch.cat([batch.batch, batch.batch.new_full((pad_atoms,), num_graphs)]),
        edge_index=torch.cat([batch.edge_index, batch.edge_index.new_full((2, pad_edges), num_atoms)], dim=1),
        cell_offset=torch.cat([offset, up]),
        graph_spec=batch.graph_spec,
        ids=[*batch.ids, "padding"],
        padding=pad_atoms,
    )
    return batch.with_bucket(bucket)


class BucketedGraphs:
    """What the loader workers do to each collated batch under shape buckets: its radius graph, then its
    bucket.  Picklable (sent to the worker processes)."""

    def __init__(self, graphs: GraphBuilder, atoms_multiple: int, edges_multiple: int) -> None:
        self.graphs, self.atoms_multiple, self.edges_multiple = graphs, atoms_multiple, edges_multiple

    def __call__(self, batch: AtomsBatch) -> AtomsBatch:
        return pad_to_bucket(self.graphs(batch), self.atoms_multiple, self.edges_multiple)


def pads(plan) -> bool:
    """Whether the ExecutionPlan `plan` has shape buckets."""
    return bool(plan.pad_atoms_multiple or plan.pad_edges_multiple)


def loader_prepare(graphs: GraphBuilder | None, plan) -> Callable[[AtomsBatch], AtomsBatch] | None:
    """The trainer's loader-worker step under `plan`: `graphs` (data.build_graphs), padded to the plan's
    buckets when it has them.  Without graphs built ahead there is nothing to pad in the workers (the edge
    count is known only once the graph is searched): the model's hooks pad those batches."""
    if graphs is None or not pads(plan):
        return graphs
    return BucketedGraphs(graphs, plan.pad_atoms_multiple, plan.pad_edges_multiple)


def fits(batch: AtomsBatch, atoms_multiple: int, edges_multiple: int) -> bool:
    """Whether `batch.bucket` is the bucket these multiples give (host-side shapes only)."""
    bucket = batch.bucket
    if bucket is None or batch.edge_index is None:
        return False
    shape = bucket_shape(batch.pos.shape[0], batch.edge_index.shape[1], atoms_multiple, edges_multiple)
    return shape == (bucket.pos.shape[0], bucket.edge_index.shape[1])


def bucket_of(model: nn.Module, batch: AtomsBatch, atoms_multiple: int, edges_multiple: int) -> AtomsBatch:
    """The bucket `model` (an EquiformerV2) runs `batch` on: the one built with the batch if it fits these
    multiples, else built here, after searching the radius graph as the model would (with its input checks
    when `model.validate_inputs`) if the batch has none.  A bucket given directly is run as it is."""
    if batch.padding:
        return batch
    if fits(batch, atoms_multiple, edges_multiple):
        return batch.bucket
    if batch.edge_index is None:
        builder = GraphBuilder.for_model(model.cfg)
        pos = batch.pos if batch.pos.dtype == torch.float64 else batch.pos.float()
        with full_precision(pos.device.type):  # the search's distances, never in bf16 under autocast
            graph = search_graph(batch, pos, *builder.spec, validate=model.validate_inputs)
        batch = replace(batch, edge_index=graph.edge_index, cell_offset=graph.cell_offset, graph_spec=builder.spec)
    return pad_to_bucket(batch, atoms_multiple, edges_multiple).bucket


def _pad_input(model, args, kwargs, *, atoms_multiple: int, edges_multiple: int):
    batch = args[0] if args else kwargs["batch"]
    return (bucket_of(model, batch, atoms_multiple, edges_multiple),), {}


def _real_outputs(model, args, kwargs, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The outputs for the bucket's real structures: its leading atoms and structures (views, no copy)."""
    bucket = args[0]
    atoms, graphs = bucket.pos.shape[0] - bucket.padding, bucket.num_graphs - 1
    return {k: v.narrow(0, 0, atoms if k in PER_ATOM_OUTPUTS else graphs) for k, v in out.items()}


def install_bucket_hooks(model: nn.Module, plan) -> None:
    """Make `model` (an EquiformerV2) run every batch on its bucket under `plan` and return outputs for the
    batch's structures only; removes hooks a previous plan installed.  Parameters and the state dict are
    untouched; the hooks are module-level functions (a copied or pickled model keeps working)."""
    for handle in getattr(model, "_bucket_hooks", ()):
        handle.remove()
    model._bucket_hooks = ()
    if pads(plan):
        pad = functools.partial(_pad_input, atoms_multiple=plan.pad_atoms_multiple,
                                edges_multiple=plan.pad_edges_multiple)
        model._bucket_hooks = (model.register_forward_pre_hook(pad, with_kwargs=True),
                               model.register_forward_hook(_real_outputs, with_kwargs=True))
