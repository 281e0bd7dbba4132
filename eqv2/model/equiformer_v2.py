"""EquiformerV2 (Liao et al., ICLR 2024), the whole network (paper Sec. 4, Fig. 1).

Graph (radius 12 Å, <= 20 neighbours, periodic; built here, or ahead in the data-loader workers
and passed in the batch) -> per-edge Wigner-D (once, shared by all blocks)
-> atom embedding + edge-degree embedding -> N Transformer blocks -> final norm ->
energy head (FFN -> degree-0 scalar per atom -> sum / avg_num_nodes) and direct force head
(graph attention -> degree-1 output per atom); or, with `forces: gradient` (beyond the paper), forces
and stress as derivatives of the energy (conservative.py).

Departures from the reference implementation (fairchem), none of which change the function:
- the roll of each edge frame about the edge is fixed instead of drawn at random inside forward;
- rotated edge features are kept in m-primary order throughout (no permutation matmuls);
- nothing is stored on modules during forward; geometry, Wigner-D matrices, normalisation
  statistics, softmax and neighbour sums stay in float32 under bf16 autocast.

How the model is executed is not part of `ModelConfig`: `eqv2.execution.apply_plan` sets the attributes
below (`validate_inputs`, `rotation_align`, `rotation_type`) and swaps the custom-kernel modules of
eqv2/kernels/ into a built model; the defaults are the paper modules as written.  Shape buckets (padding
with an inert dummy structure for compiled code and CUDA graphs) are made where batches are built, or by
hooks the plan installs around this forward (eqv2/buckets.py); the forward computes every structure it is
given.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from eqv2.batch import AtomsBatch
from eqv2.model.conservative import edge_wigner, gradient_outputs, polynomial_envelope
from eqv2.model.config import ModelConfig
from eqv2.model.edge_degree_embedding import EdgeDegreeEmbedding
from eqv2.model.feed_forward import FeedForwardNetwork
from eqv2.model.graph import RadiusGraph, graph_from_offsets, search_graph
from eqv2.model.graph_attention import EquivariantGraphAttention
from eqv2.model.layer_norm import make_norm
from eqv2.model.radial import AtomEdgeEmbedding, GaussianRadialBasis, RadialFunction
from eqv2.model.rank2_head import Rank2SymmetricTensorHead
from eqv2.model.so2_convolution import SO2Convolution
from eqv2.model.so3 import (CoefficientLayout, EdgeRotation, SO3Linear, WignerD, compute_dtype, full_precision,
                            rotation_matrices)
from eqv2.model.transformer_block import TransformerBlock, drop_path_scales


class EquiformerV2(nn.Module):
    """`model(batch) -> {"energy": [B], "forces": [N, 3]}` in the units of the training targets,
    "stress" [B, 3, 3] for `forces: gradient` (derivatives of the normalised energy), and with a stress
    head its normalised parts (`rank2_head.Rank2SymmetricTensorHead`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.layout = CoefficientLayout(cfg.lmax, cfg.mmax)
        self.atom_embedding = nn.Embedding(cfg.max_num_elements, cfg.sphere_channels)
        self.radial_basis = GaussianRadialBasis(cfg.max_radius, cfg.num_distance_basis)
        self.wigner = WignerD(cfg.lmax)
        # the edge rotation's index tables, on the model's device (no host-to-device copy per forward)
        self.register_buffer("rotation_index", self.layout.reduced_to_full.clone(), persistent=False)
        self.register_buffer("rotation_degree", self.layout.degree_of_reduced.clone(), persistent=False)
        self.edge_degree_embedding = EdgeDegreeEmbedding(cfg)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = make_norm(cfg.norm_type, cfg.lmax, cfg.sphere_channels)
        self.energy_head = FeedForwardNetwork(cfg, 1)
        direct = cfg.regress_forces and cfg.forces == "direct"
        self.force_head = EquivariantGraphAttention(cfg, 1, alpha_drop=0.0) if direct else None
        self.stress_head = Rank2SymmetricTensorHead(cfg, cfg.stress_head) if cfg.stress_head is not None else None
        # execution (eqv2/execution.py apply_plan; these defaults are the reference plan): host-side checks of
        # a graph searched here, Wigner rows padded to a multiple of `rotation_align` elements, and the class
        # of the per-batch edge rotation
        self.validate_inputs = True
        self.rotation_align = 1
        self.rotation_type = EdgeRotation
        self._init_weights(self.modules())

    @torch.no_grad()
    def _init_weights(self, modules) -> None:
        """Reference initialisation of `modules` (of this model): zero biases; weights uniform or normal
        with std 1/sqrt(fan_in); radial functions always uniform; LayerNorms identity."""
        modules = list(modules)  # a radial function's linears are among `modules` when it is
        radial_linears = {id(m) for r in modules if isinstance(r, RadialFunction) for m in r.modules()}
        for module in modules:
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
                continue
            if not isinstance(module, (nn.Linear, SO3Linear)):
                continue
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            fan_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            if self.cfg.weight_init == "normal" and id(module) not in radial_linears:
                nn.init.normal_(module.weight, 0.0, 1.0 / math.sqrt(fan_in))

    @torch.no_grad()
    def init_partitioned(self, gather) -> None:
        """Redo the initialisation steps that act on parameters of already-built submodules, for a model
        whose parameters were partitioned across ranks as each submodule was built (DeepSpeed ZeRO-3's
        `zero.Init`): there those steps saw empty shards.  `gather(params)` is a context manager that
        makes `params` whole and writable and keeps what one rank writes (the trainer passes DeepSpeed's
        GatheredParameters with modifier_rank=0).  Each submodule's own initialisation ran before its
        parameters were partitioned and is kept.

        One gather per block and per other top-level part (a block of the 14B-parameter L_max 8
        configuration is 145M parameters): gathering each small module apart cost ~3 s per block on
        two CPU ranks, dozens of collectives each."""
        parts = [*self.blocks, *(m for name, m in self.named_children() if name != "blocks")]
        for part in parts:
            params = list(part.parameters())
            if not params:
                continue
            with gather(params):
                for module in part.modules():
                    if isinstance(module, (RadialFunction, AtomEdgeEmbedding, SO2Convolution)):
                        module.reset_parameters()
                self._init_weights(part.modules())

    def _graph(self, batch: AtomsBatch, pos: torch.Tensor) -> RadiusGraph:
        """The batch's radius graph: from the edges found in the data-loader workers (GraphBuilder,
        which also checked the structures) when the batch has them, else searched and checked here."""
        cfg = self.cfg
        if batch.edge_index is not None:
            spec = (float(cfg.max_radius), int(cfg.max_neighbors), int(cfg.max_num_elements),
                    bool(cfg.enforce_max_neighbors_strictly))
            if batch.graph_spec != spec:
                raise ValueError(f"the batch's graph was built for (max_radius, max_neighbors, max_num_elements, "
                                 f"enforce_max_neighbors_strictly) = {batch.graph_spec}, the model has {spec}")
            return graph_from_offsets(pos, batch.cell, batch.batch, batch.edge_index, batch.cell_offset)
        return search_graph(batch, pos, cfg.max_radius, cfg.max_neighbors, cfg.max_num_elements,
                            cfg.enforce_max_neighbors_strictly, self.validate_inputs)

    def edge_frames(self, edge_vec: torch.Tensor, distance: torch.Tensor, dtype: torch.dtype):
        """Per-edge quantities every block shares (Sec. 3.3): the rotations to and from each edge's
        frame (`so3.rotation_matrices`) and the distance basis, computed in full precision and cast
        once to `dtype`, the blocks' matrix-product dtype (the radial functions' first products would
        cast the basis anyway).  A compiled part on the GPU (`training.compile`): its outputs stay in
        the CUDA-graph pool the blocks read from.
        edge_vec [E, 3], distance [E] -> to_edge [E, K, (L+1)^2], from_edge [E, (L+1)^2, K], basis [E, B]."""
        tables = (self.rotation_index, self.rotation_degree)
        # gradient forces: differentiable frames without a singular direction along the axes (conservative.py)
        wigner = self.wigner(edge_vec) if self.cfg.forces == "direct" else edge_wigner(self.wigner, edge_vec)
        to_edge, from_edge = rotation_matrices(wigner, self.layout, dtype, self.rotation_align, tables)
        return to_edge, from_edge, self.radial_basis(distance).to(dtype)

    def forward(self, batch: AtomsBatch) -> dict[str, torch.Tensor]:
        if self.cfg.forces == "gradient":
            return gradient_outputs(lambda strained: self.energy_and_direct_forces(strained)["energy"], batch)
        return self.energy_and_direct_forces(batch)

    def energy_and_direct_forces(self, batch: AtomsBatch) -> dict[str, torch.Tensor]:
        """The paper's network: energy [B] and, with the direct head, forces [N, 3]."""
        cfg = self.cfg
        z = batch.atomic_numbers.long()
        num_nodes, num_graphs = z.shape[0], batch.natoms.shape[0]
        pos = batch.pos if batch.pos.dtype == torch.float64 else batch.pos.float()  # geometry in full precision
        # the blocks' matrix-product dtype (bfloat16 under autocast), read before autocast is turned off
        # for the geometry: the rotation matrices are cast to it once here, not in every block
        dtype = compute_dtype(pos)
        with full_precision(pos.device.type):
            graph = self._graph(batch, pos)
            graph_of_atom = batch.batch
            to_edge, from_edge, distance_basis = self.edge_frames(graph.edge_vec, graph.distance, dtype)
        edge_index = graph.edge_index
        envelope = polynomial_envelope(graph.distance, cfg.max_radius) if cfg.cutoff_envelope == "polynomial" else None
        rotation = self.rotation_type.for_edges(to_edge, from_edge, edge_index, envelope)  # shared by all blocks
        x = torch.zeros(num_nodes, (cfg.lmax + 1) ** 2, cfg.sphere_channels, device=pos.device, dtype=pos.dtype)
        x[:, 0, :] = self.atom_embedding(z).to(pos.dtype)
        x = x + self.edge_degree_embedding(z, distance_basis, edge_index, rotation).to(pos.dtype)
        drop = drop_path_scales(len(self.blocks), graph_of_atom, num_graphs, cfg.drop_path_rate, self.training,
                                x.dtype)  # [L, 2, N] or None
        for i, block in enumerate(self.blocks):
            x = block(x, z, distance_basis, edge_index, rotation, drop[i] if drop is not None else None)
        x = self.norm(x)  # [N, (L+1)^2, C]
        node_energy = self.energy_head(x).narrow(1, 0, 1).reshape(-1)  # [N]
        energy = torch.zeros(num_graphs, device=x.device, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype)
        energy = energy.index_add(0, graph_of_atom, node_energy.to(energy.dtype))
        if cfg.energy_reduce == "mean":  # per-atom energy (fairchem heads' reduce: mean)
            energy = energy / torch.bincount(graph_of_atom, minlength=num_graphs).clamp(min=1).to(energy.dtype)
        else:
            energy = energy / cfg.avg_num_nodes
        out = {"energy": energy}
        if self.stress_head is not None:  # normalised parts; the Potential assembles the tensor (rank2_head.py)
            parts = self.stress_head(x, edge_index, graph.edge_vec, graph_of_atom, num_graphs)
            out.update({k: v.to(energy.dtype) for k, v in parts.items()})
        if self.force_head is not None:
            forces = self.force_head(x, z, distance_basis, edge_index, rotation)  # [N, (L+1)^2, 1]
            forces = forces.narrow(1, 1, 3)  # degree 1 = (x, y, z)
            out["forces"] = forces.reshape(-1, 3).to(energy.dtype)
        return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
