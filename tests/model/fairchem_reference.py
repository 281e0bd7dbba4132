"""Build fairchem-core 1.10.0's EquiformerV2 (the reference) beside eqv2's, for parity tests.

fairchem imports torch_scatter at module level; tests/model/fairchem_shim holds a tiny stand-in.
The reference draws a random roll angle per edge; here its edge frames are replaced by eqv2's
deterministic ones (same edge direction, roll fixed), which the model is invariant to up to the
S2-grid sampling error, so that outputs can be compared to float32 round-off.
"""
from __future__ import annotations

import contextlib
import importlib
import sys

import numpy as np
import torch

from eqv2.fairchem_compat import fairchem_hparams  # noqa: F401  (the reference's arguments for a ModelConfig)



def import_fairchem():
    """fairchem's legacy and hydra EquiformerV2 modules; torch_scatter (imported by fairchem at module
    level, no wheel for current torch) is the stand-in in fairchem_shim/ when it is not installed."""
    try:
        import torch_scatter  # noqa: F401
    except ImportError:
        sys.modules["torch_scatter"] = importlib.import_module("tests.model.fairchem_shim.torch_scatter")
    import fairchem.core.models.equiformer_v2.equiformer_v2_deprecated as legacy  # noqa: F401
    import fairchem.core.models.equiformer_v2.equiformer_v2 as hydra_mod  # noqa: F401
    return legacy, hydra_mod


def eqv2_edge_frames(edge_vec: torch.Tensor) -> torch.Tensor:
    """[E, 3, 3] rotations taking each edge direction to +y with zero roll (eqv2's convention)."""
    d = edge_vec / edge_vec.norm(dim=1, keepdim=True)
    alpha = torch.atan2(d[:, 0], d[:, 2])
    # R = (Ry(alpha) Rx(beta))^T with cos(beta), sin(beta) the direction's own y and (x, z) lengths, not the
    # cosine of a rounded angle: R e_y = (0, d_y, -hypot(d_x, d_z)), from which fairchem reads its polar angle
    # (acos), as its own frames give it d_y (eqv2.model.so3.fairchem_polar_angle does the same)
    cos_b, sin_b = d[:, 1], torch.hypot(d[:, 0], d[:, 2])
    cos_a, sin_a, zero = torch.cos(alpha), torch.sin(alpha), torch.zeros_like(alpha)
    m = torch.stack([torch.stack([cos_a, sin_a * sin_b, sin_a * cos_b], -1),
                     torch.stack([zero, cos_b, -sin_b], -1),
                     torch.stack([-sin_a, cos_a * sin_b, cos_a * cos_b], -1)], -2)  # Ry(alpha) Rx(beta)
    return m.transpose(1, 2)


@contextlib.contextmanager
def deterministic_frames(*modules):
    saved = [m.init_edge_rot_mat for m in modules]
    for m in modules:
        m.init_edge_rot_mat = eqv2_edge_frames
    try:
        yield
    finally:
        for m, fn in zip(modules, saved):
            m.init_edge_rot_mat = fn


@contextlib.contextmanager
def stable_sort():
    """torch.sort made stable while the reference runs (tests only).

    The reference picks among equidistant neighbours with an unstable `torch.sort` of each atom's
    candidate distances.  On CUDA, where the published models were trained, that sort returns the
    stable order for rows longer than 32 (every atom's row is as long as the batch's largest candidate
    count: hundreds at 12 Å); the CPU's std::sort-based one does not, and keeps other neighbours
    among ties.  eqv2 keeps the CUDA (stable) choice, so the CPU reference is compared with it here."""
    unstable = torch.sort

    def sort(input, dim=-1, descending=False, stable=False, out=None):
        assert out is None
        return unstable(input, dim=dim, descending=descending, stable=True)

    torch.sort = sort
    try:
        yield
    finally:
        torch.sort = unstable


def fairchem_graph(batch, max_radius: float, max_neighbors: int, strict: bool):
    """The reference's own graph of an eqv2 batch, as its models build it (otf_graph, use_pbc):
    `GraphModelMixin.generate_graph`, with the CUDA tie rule (`stable_sort`).  Returns its GraphData."""
    from fairchem.core.models.base import GraphModelMixin

    builder = GraphModelMixin()
    builder.cutoff, builder.max_neighbors, builder.enforce_max_neighbors_strictly = max_radius, max_neighbors, strict
    builder.use_pbc, builder.use_pbc_single, builder.otf_graph = True, False, True
    with stable_sort():
        return builder.generate_graph(otf_pyg_batch(batch))


def pbc_distances64(pos, edge_index, cell, cell_offsets, neighbors, return_offsets=False, return_distance_vec=False):
    """fairchem's `get_pbc_distances` (fairchem.core.models.base) with the periodic offsets in the positions'
    dtype: fairchem computes cell_offsets @ cell in float32 whatever the dtype (.float()), which puts edge
    lengths off by up to 8e-7 A in a float64 run.  Same arguments and outputs; self-loops dropped as there."""
    row, col = edge_index
    cell = torch.repeat_interleave(cell, neighbors.to(cell.device), dim=0)
    offsets = cell_offsets.to(pos.dtype).view(-1, 1, 3).bmm(cell.to(pos.dtype)).view(-1, 3)
    vec = pos[row] - pos[col] + offsets
    distance = vec.norm(dim=-1)
    keep = distance != 0
    out = {"edge_index": edge_index[:, keep], "distances": distance[keep]}
    if return_distance_vec:
        out["distance_vec"] = vec[keep]
    if return_offsets:
        out["offsets"] = offsets[keep]
    return out


def float32_selection(select):
    """fairchem's neighbour selection `select` (its `radius_graph_pbc`, which casts the cell to float32) run on
    the positions and cell rounded to float32, under the float32 default dtype, whatever the caller's dtype:
    in a float64 run it then picks the same neighbours as eqv2's float32 graph."""

    def select32(data, *args, **kwargs):
        pos, cell, previous = data.pos, data.cell, torch.get_default_dtype()
        data.pos, data.cell = pos.float(), cell.float()
        torch.set_default_dtype(torch.float32)
        try:
            return select(data, *args, **kwargs)
        finally:
            data.pos, data.cell = pos, cell
            torch.set_default_dtype(previous)

    return select32


def otf_pyg_batch(batch):
    """torch_geometric Batch of an eqv2 batch without a graph: the reference builds its own (otf_graph)."""
    from torch_geometric.data import Data

    data = Data(pos=batch.pos, atomic_numbers=batch.atomic_numbers.float(), cell=batch.cell, natoms=batch.natoms,
                batch=batch.batch, pbc=batch.pbc)
    data.num_graphs = batch.num_graphs
    return data


def calculator_batch(atoms):
    """The batch fairchem's OCPCalculator makes of `atoms` (its AtomsToGraphs: positions wrapped into the cell
    in float64, then float32), without a graph: the reference builds its own (otf_graph)."""
    from fairchem.core.datasets import data_list_collater
    from fairchem.core.preprocessing import AtomsToGraphs

    a2g = AtomsToGraphs(r_energy=False, r_forces=False, r_distances=False, r_pbc=True, r_edges=False)
    return data_list_collater([a2g.convert(atoms)], otf_graph=True)


def pyg_batch(batch, graph):
    """torch_geometric Batch with eqv2's graph precomputed (fairchem then skips its own)."""
    from torch_geometric.data import Data

    data = Data(
        pos=batch.pos, atomic_numbers=batch.atomic_numbers.float(), cell=batch.cell, natoms=batch.natoms,
        batch=batch.batch, edge_index=graph.edge_index, cell_offsets=graph.cell_offset.float(),
        neighbors=torch.bincount(batch.batch[graph.edge_index[1]], minlength=batch.num_graphs),
    )
    data.num_graphs = batch.num_graphs
    return data


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter random values so no part of the network hides behind its init
    (LayerNorm ones/zeros, zero biases)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def slab_structures(seed: int, count: int):
    """Synthetic adsorbate+slab structures (ASE fcc111 surfaces with adsorbates, rattled)."""
    from ase.build import add_adsorbate, fcc111, molecule

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        metal = ["Cu", "Pt", "Ag", "Ni"][i % 4]
        slab = fcc111(metal, size=(2, 2, 3), vacuum=7.0)
        add_adsorbate(slab, molecule(["CO", "OH", "H2O", "NH3"][i % 4]), 2.0, "ontop")
        slab.rattle(0.05, seed=int(rng.integers(1 << 30)))
        out.append(slab)
    return out
