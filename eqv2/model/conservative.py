"""Conservative forces and stress from the energy (`model.forces: gradient`; beyond the paper).

EquiformerV2 predicts forces with a direct head (paper Sec. 4): fast, but not the gradient of any
energy, so molecular dynamics with them does not conserve energy and there is no stress.  Here the
forces are F = -dE/dx by autograd through the edge vectors (the model computes them from positions and
cells, `graph.graph_from_offsets`), and the stress is the derivative with respect to a homogeneous
strain of the cell: positions and lattice vectors are mapped by (I + eps), eps symmetric, and

    stress = (1 / V) dE/d(eps) at eps = 0     (ASE's sign and units: energy units / Å^3)

The edge frames must then carry gradients too.  The paper's frame (so3.WignerD) rotates each edge to
+y by two angles whose derivatives are undefined for edges along +-y, and crystals have edges exactly
along the coordinate axes; here every edge is first turned by one fixed rotation Q0 that takes a
generic axis a0 (no lattice direction) to +y, so only edges exactly along +-a0 are singular.  The two
frames differ by a roll about the edge, to which the SO(2) convolutions are invariant (Sec. 3.3).

The paper's energy jumps when a neighbour crosses max_radius (its edge appears with a finite message)
or the max_neighbors cap (one neighbour replaces another): between such events gradient forces conserve
energy, at them it is not.  `cutoff_envelope: polynomial` fades every edge's messages out at max_radius
(the edge-degree embedding's sum and the attention's weights, w exp(l) / sum w exp(l)); with a cap that
never binds (max_neighbors above any atom's count within max_radius) the energy is then smooth.

Both come from one backward pass over the energy.  When the caller records gradients (training), the
pass keeps its graph (`create_graph`), so that a loss on the forces and stress reaches the weights
(double backward); under `torch.no_grad` (prediction) the outputs are plain tensors.  Structures
without a cell (zero volume) get a NaN stress.
"""
from __future__ import annotations

from dataclasses import replace
import math
from typing import Callable

import torch

from eqv2.batch import AtomsBatch
from eqv2.model.so3 import full_precision


# the generic axis a0 (unit vector (1, e, pi) / |.|): the only edge directions without a gradient are +-a0
GENERIC_AXIS = (1.0, math.e, math.pi)


def edge_wigner(wigner, edge_vec: torch.Tensor) -> torch.Tensor:
    """Differentiable Wigner-D matrices [E, (L+1)^2, (L+1)^2] of edge frames that take each edge to +y:
    D(R(Q0 v)) D(Q0), `wigner` the model's `so3.WignerD` (whose degree-1 block is the Cartesian rotation)."""
    with torch.no_grad():
        axis = edge_vec.new_tensor(GENERIC_AXIS)
        to_y = wigner.matrices(axis[None])[0]  # D(Q0) [(L+1)^2, (L+1)^2], Q0 a0 = |a0| e_y
    q0 = to_y[1:4, 1:4]  # [3, 3]
    return torch.matmul(wigner.matrices(edge_vec @ q0.T), to_y)


def polynomial_envelope(distance: torch.Tensor, cutoff: float, p: int = 5) -> torch.Tensor:
    """[E] weights 1 - (p+1)(p+2)/2 d^p + p(p+2) d^(p+1) - p(p+1)/2 d^(p+2), d = r / cutoff (DimeNet's
    envelope): 1 at r = 0, and zero with its first two derivatives at the cutoff (model.cutoff_envelope)."""
    d = (distance / cutoff).clamp(max=1.0)
    return 1 - (p + 1) * (p + 2) / 2 * d**p + p * (p + 2) * d ** (p + 1) - p * (p + 1) / 2 * d ** (p + 2)


def strained(batch: AtomsBatch, displacement: torch.Tensor, pos: torch.Tensor) -> AtomsBatch:
    """`batch` with positions `pos` [N, 3] and cells mapped by (I + eps), eps the symmetric part of
    `displacement` [B, 3, 3] (rows are vectors: x' = x (I + eps))."""
    eps = 0.5 * (displacement + displacement.transpose(1, 2))  # [B, 3, 3]
    cell = batch.cell.to(pos.dtype)
    new_pos = pos + torch.bmm(pos.unsqueeze(1), eps.index_select(0, batch.batch)).squeeze(1)  # [N, 3]
    return replace(batch, pos=new_pos, cell=cell + torch.bmm(cell, eps))


def gradient_outputs(energy_fn: Callable[[AtomsBatch], torch.Tensor], batch: AtomsBatch) -> dict[str, torch.Tensor]:
    """{"energy": [B], "forces": [N, 3] = -dE/dpos, "stress": [B, 3, 3] = (1/V) dE/d(strain)} of
    `energy_fn(batch) -> [B]`, in the energy's units (per Å, per Å^3)."""
    keep_graph = torch.is_grad_enabled()
    dtype = batch.pos.dtype if batch.pos.dtype == torch.float64 else torch.float32
    with torch.enable_grad():
        pos = batch.pos.detach().to(dtype).requires_grad_(True)
        displacement = torch.zeros(batch.num_graphs, 3, 3, dtype=dtype, device=pos.device, requires_grad=True)
        with full_precision(pos.device.type):  # geometry: autocast would round the positions to bf16
            deformed = strained(batch, displacement, pos)
        energy = energy_fn(deformed)  # [B]
        # autocast off, as for any backward pass: on the CPU the backward runs in this thread, where autocast
        # would recast the gradient products to bf16 (each op still gets the dtype its forward saved)
        with full_precision(pos.device.type):
            grad_pos, grad_strain = torch.autograd.grad(energy.sum(), (pos, displacement), create_graph=keep_graph)
    with full_precision(pos.device.type):
        volume = torch.linalg.det(batch.cell.to(dtype)).abs()  # [B]
        stress = grad_strain.to(dtype) / torch.where(volume > 0, volume, torch.nan)[:, None, None]
    if not keep_graph:
        energy = energy.detach()
    return {"energy": energy, "forces": -grad_pos.to(energy.dtype), "stress": stress.to(energy.dtype)}
