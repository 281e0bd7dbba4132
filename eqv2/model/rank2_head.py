"""Rank-2 symmetric tensor head: the direct stress output of the OMat24 / MPtrj / sAlex EquiformerV2
models (fairchem's `rank2_symmetric_head`, Barroso-Luque et al. 2024, "Open Materials 2024").

Beyond the EquiformerV2 paper.  Per edge j -> i, the final node features of the target atom i (with
`use_source_target_embedding` those of the source j beside them, channels concatenated) are
contracted over their (l, m) coefficients with the spherical harmonics of the edge vector
(unnormalised vector, e3nn's "integral" normalisation, all degrees 0..L_max, normalised by a
one-channel copy of the backbone's norm) and layer-normalised: one scalar feature vector per edge.
Then either
- `decompose`: an isotropic part (an MLP of the features) and an anisotropic part (an MLP of the
  features times the degree-2 harmonics of the edge direction), or
- the whole tensor: an MLP of the features times the outer product r r^T of the edge vector,
with the MLP applied per edge before averaging over each atom's edges (`edge_level_mlp`) or per atom
after, and a mean (or, `extensive`, a sum) over the structure's atoms.

The outputs are in the units of the stress normalisers (`eqv2.normalizers.StressNormalizers`);
`symmetric_tensor` assembles the 3x3 tensor from the two parts after denormalisation, as fairchem's
trainer does.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from eqv2.model.config import ModelConfig, Rank2HeadConfig
from eqv2.model.layer_norm import make_norm


def _mlp(width: int, layers: int) -> nn.Sequential:
    """Linear(width, width), SiLU, ..., Linear(width, 1): `layers` linear layers."""
    modules: list[nn.Module] = []
    for _ in range(layers - 1):
        modules += [nn.Linear(width, width), nn.SiLU()]
    modules.append(nn.Linear(width, 1))
    return nn.Sequential(*modules)


def _mean_over(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Mean of `values` [E, ...] grouped by `index` [E] into [size, ...] (0 for empty groups)."""
    total = values.new_zeros((size, *values.shape[1:])).index_add(0, index, values)
    count = torch.bincount(index, minlength=size).clamp(min=1).to(values.dtype)
    return total / count.view(-1, *([1] * (values.dim() - 1)))


def _anisotropic_basis() -> torch.Tensor:
    """[5, 9]: the symmetric traceless 3x3 tensors (row-major) of unit norm whose components are the
    degree-2 real spherical harmonics in e3nn's order: (xz, xy, (2yy - xx - zz)/sqrt 3, yz, (zz - xx))
    up to normalisation (e3nn's y is the polar axis)."""
    def sym(a: int, b: int) -> torch.Tensor:
        t = torch.zeros(3, 3, dtype=torch.float64)
        t[a, b] = t[b, a] = 1.0 / math.sqrt(2.0)
        return t

    x, y, z = 0, 1, 2
    polar = torch.diag(torch.tensor([-1.0, 2.0, -1.0], dtype=torch.float64)) / math.sqrt(6.0)
    planar = torch.diag(torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)) / math.sqrt(2.0)
    return torch.stack([sym(x, z), sym(x, y), polar, sym(y, z), planar]).reshape(5, 9)


def symmetric_tensor(isotropic: torch.Tensor, anisotropic: torch.Tensor) -> torch.Tensor:
    """isotropic [B], anisotropic [B, 5] -> [B, 3, 3]: iso / sqrt(3) * I + sum_k aniso_k T_k, the
    change of basis fairchem's trainer applies to a decomposed rank-2 prediction."""
    basis = _anisotropic_basis().to(anisotropic)
    eye = torch.eye(3, dtype=anisotropic.dtype, device=anisotropic.device).reshape(1, 9)
    flat = isotropic.reshape(-1, 1) * eye / math.sqrt(3.0) + anisotropic @ basis
    return flat.reshape(-1, 3, 3)


class Rank2SymmetricTensorHead(nn.Module):
    """`head(x, edge_index, edge_vec, graph_of_atom, num_graphs)` -> {"stress_isotropic": [B],
    "stress_anisotropic": [B, 5]} (decompose) or {"stress_direct": [B, 3, 3]}, normalised."""

    def __init__(self, cfg: ModelConfig, head: Rank2HeadConfig):
        super().__init__()
        self.cfg, self.head = cfg, head
        width = cfg.sphere_channels * (2 if head.use_source_target_embedding else 1)
        self.sphharm_norm = make_norm(cfg.norm_type, cfg.lmax, 1)
        self.xedge_layer_norm = nn.LayerNorm(width)
        self.block = nn.Module()
        if head.decompose:
            self.block.scalar_MLP = _mlp(width, head.num_mlp_layers)
            self.block.irrep2_MLP = _mlp(width, head.num_mlp_layers)
        else:
            self.block.r2tensor_MLP = _mlp(width, head.num_mlp_layers)

    def edge_features(self, x: torch.Tensor, edge_index: torch.Tensor, edge_vec: torch.Tensor) -> torch.Tensor:
        """x [N, (L+1)^2, C] -> [E, C'] (C' = C or 2C)."""
        from e3nn import o3

        harmonics = o3.spherical_harmonics(list(range(self.cfg.lmax + 1)), edge_vec, False)  # [E, (L+1)^2]
        harmonics = self.sphharm_norm(harmonics.unsqueeze(-1)).squeeze(-1)
        source, target = edge_index
        features = x.index_select(0, target)  # [E, (L+1)^2, C]
        if self.head.use_source_target_embedding:
            features = torch.cat([x.index_select(0, source), features], dim=2)
        return self.xedge_layer_norm(torch.einsum("ekc,ek->ec", features, harmonics.to(features.dtype)))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_vec: torch.Tensor, graph_of_atom: torch.Tensor,
                num_graphs: int) -> dict[str, torch.Tensor]:
        head, num_nodes, target = self.head, x.shape[0], edge_index[1]
        edge = self.edge_features(x, edge_index, edge_vec)  # [E, C']

        def pool(node: torch.Tensor) -> torch.Tensor:  # [N, ...] -> [B, ...]
            if head.extensive:
                return node.new_zeros((num_graphs, *node.shape[1:])).index_add(0, graph_of_atom, node)
            return _mean_over(node, graph_of_atom, num_graphs)

        if head.decompose:
            from e3nn import o3

            irrep2 = o3.spherical_harmonics(2, edge_vec, True).to(edge.dtype)  # [E, 5]
            edge_irrep2 = irrep2.unsqueeze(2) * edge.unsqueeze(1)  # [E, 5, C']
            if head.edge_level_mlp:
                node_scalar = _mean_over(self.block.scalar_MLP(edge), target, num_nodes)  # [N, 1]
                node_irrep2 = _mean_over(self.block.irrep2_MLP(edge_irrep2), target, num_nodes)  # [N, 5, 1]
            else:
                node_scalar = self.block.scalar_MLP(_mean_over(edge, target, num_nodes))
                node_irrep2 = self.block.irrep2_MLP(_mean_over(edge_irrep2, target, num_nodes))
            isotropic, anisotropic = pool(node_scalar.reshape(-1)), pool(node_irrep2.reshape(-1, 5))
            if head.extensive:
                isotropic, anisotropic = isotropic / head.avg_num_nodes, anisotropic / head.avg_num_nodes
            return {"stress_isotropic": isotropic, "stress_anisotropic": anisotropic}
        outer = (edge_vec.unsqueeze(2) * edge_vec.unsqueeze(1)).reshape(-1, 1, 9).to(edge.dtype)  # [E, 1, 9]
        edge_outer = edge.unsqueeze(2) * outer  # [E, C', 9]
        if head.edge_level_mlp:
            node = _mean_over(self.block.r2tensor_MLP(edge_outer.transpose(1, 2)).reshape(-1, 9), target, num_nodes)
        else:
            node = self.block.r2tensor_MLP(_mean_over(edge_outer, target, num_nodes).transpose(1, 2)).reshape(-1, 9)
        return {"stress_direct": pool(node).reshape(-1, 3, 3)}  # the extensive tensor is not divided (as fairchem)
