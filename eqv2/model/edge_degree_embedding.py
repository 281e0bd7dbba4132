"""Edge-degree embedding (paper Sec. 4, Fig. 1a).

Each edge contributes an irreps feature to its target atom: a radial function of the edge scalars
(distance basis and atom types) gives the m = 0 coefficients of every degree in the edge frame
(an SO(2) linear layer acting on the rotated constant input), which are rotated back by D_ij^-1,
summed over neighbours and divided by the average degree.  It is added to the atom embedding.
"""
from __future__ import annotations

import torch
from torch import nn

from eqv2.model.config import ModelConfig
from eqv2.model.radial import AtomEdgeEmbedding, RadialFunction
from eqv2.model.so3 import CoefficientLayout, EdgeRotation


class EdgeDegreeEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layout = CoefficientLayout(cfg.lmax, cfg.mmax)
        self.channels = cfg.sphere_channels
        self.avg_degree = cfg.avg_degree
        self.edge_scalars = AtomEdgeEmbedding(cfg.max_num_elements, cfg.edge_channels, cfg.use_atom_edge_embedding)
        widths = [cfg.num_distance_basis + self.edge_scalars.extra_width(), cfg.edge_channels, cfg.edge_channels]
        self.radial = RadialFunction(widths + [(cfg.lmax + 1) * cfg.sphere_channels])

    def forward(
        self,
        atomic_numbers: torch.Tensor,
        distance_basis: torch.Tensor,
        edge_index: torch.Tensor,
        rotation: EdgeRotation,
    ) -> torch.Tensor:
        """atomic_numbers [N] (every atom of the batch) -> [N, (L+1)^2, C]"""
        edge_scalars = self.edge_scalars(distance_basis, atomic_numbers, edge_index)
        m0 = self.radial(edge_scalars).reshape(-1, self.layout.lmax + 1, self.channels)  # [E, L+1, C]
        rest = m0.new_zeros(m0.shape[0], self.layout.num_reduced - m0.shape[1], self.channels)
        rotated = torch.cat([m0, rest], dim=1)  # [E, K, C] in the edge frame, only m = 0 non-zero
        if rotation.envelope is not None:  # model.cutoff_envelope: edges fade out at the cutoff
            rotated = rotated * rotation.envelope.to(rotated.dtype)[:, None, None]
        summed = rotation.rotate_scatter(rotated, edge_index[1], atomic_numbers.shape[0])
        return summed / self.avg_degree  # [N, (L+1)^2, C]
