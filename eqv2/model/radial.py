"""Radial basis and radial function: the invariant edge features of EquiformerV2 (paper Sec. 4, Fig. 1).

Edge distances are expanded in 600 Gaussians spread evenly over [0, max_radius] (width 2x their
spacing, as the reference), optionally concatenated with learned embeddings of the source and
target atom types, and mapped by a radial function (Linear-LayerNorm-SiLU twice, then Linear) to the
per-coefficient weights of an SO(2) convolution.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class GaussianRadialBasis(nn.Module):
    """exp(-(d - mu_k)^2 / (2 (w * spacing)^2)) for `num_basis` centres mu_k over [0, cutoff]."""

    def __init__(self, cutoff: float, num_basis: int = 600, width_factor: float = 2.0):
        super().__init__()
        self.num_basis, self.cutoff, self.width_factor = num_basis, cutoff, width_factor
        centres = torch.linspace(0.0, cutoff, num_basis, dtype=torch.float64)
        spacing = cutoff / (num_basis - 1)
        self.coeff = -0.5 / (width_factor * spacing) ** 2
        # float64, cast to the distances' dtype on use: float32 centres would limit a float64 model to
        # float32 accuracy (measured against fairchem in float64: 1e-7 in the loss, which Adam turns into
        # weight differences of order lr after a step); float32 models see the same values as before
        self.register_buffer("centres", centres, persistent=False)

    def build_as_fairchem(self) -> None:
        """Centres and width exactly as fairchem-core builds them: centres from a float32 linspace, the width
        from their float32 spacing (a float64 number from then on).  They differ from the float64-built ones
        by float32 round-off (up to 4e-7 Å at 12 Å), which moves float32 forces of a converted checkpoint by
        ~1e-5 relative against fairchem's; only conversion asks for it (eqv2.fairchem_compat)."""
        centres = torch.linspace(0.0, self.cutoff, self.num_basis, dtype=torch.float32)
        self.coeff = -0.5 / float(self.width_factor * (centres[1] - centres[0])) ** 2
        self.centres = centres.to(self.centres.device, torch.float64)  # float64 holds them exactly

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        """distance [E] -> [E, num_basis] (in the dtype of `distance`)."""
        diff = distance.view(-1, 1) - self.centres.to(distance.dtype).view(1, -1)
        return torch.exp(self.coeff * diff.pow(2))


class RadialFunction(nn.Module):
    """MLP over invariant edge features: (Linear, LayerNorm, SiLU) for every hidden width, then Linear."""

    def __init__(self, channels: list[int]):
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"a radial function needs at least input and output widths, got {channels}")
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            layers.append(nn.Linear(c_in, c_out))
            if i < len(channels) - 2:
                layers += [nn.LayerNorm(c_out), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference initialisation of the linear layers: uniform(+-1/sqrt(fan_in)), zero bias."""
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features)
                nn.init.uniform_(layer.weight, -bound, bound)
                nn.init.zeros_(layer.bias)

    @property
    def out_features(self) -> int:
        return self.net[-1].out_features

    def forward(self, edge_features: torch.Tensor) -> torch.Tensor:
        """[E, channels[0]] -> [E, channels[-1]]."""
        return self.net(edge_features)


class AtomEdgeEmbedding(nn.Module):
    """Edge scalars: Gaussian distance basis, concatenated with source/target atom-type embeddings.

    Each block owns its own pair of type embeddings in the published models
    (share_atom_edge_embedding = False); the distance basis is computed once per forward.
    """

    def __init__(self, max_num_elements: int, channels: int, use_atom_types: bool):
        super().__init__()
        self.use_atom_types = use_atom_types
        self.channels = channels if use_atom_types else 0
        if use_atom_types:
            self.source_embedding = nn.Embedding(max_num_elements, channels)
            self.target_embedding = nn.Embedding(max_num_elements, channels)
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference initialisation of the type embeddings: uniform(+-0.001)."""
        if self.use_atom_types:
            nn.init.uniform_(self.source_embedding.weight, -0.001, 0.001)
            nn.init.uniform_(self.target_embedding.weight, -0.001, 0.001)

    def extra_width(self) -> int:
        return 2 * self.channels

    def forward(self, distance_basis: torch.Tensor, atomic_numbers: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """[E, B] basis -> [E, B + 2*channels] edge scalars."""
        if not self.use_atom_types:
            return distance_basis
        source = self.source_embedding(atomic_numbers[edge_index[0]])
        target = self.target_embedding(atomic_numbers[edge_index[1]])
        return torch.cat([distance_basis, source.to(distance_basis.dtype), target.to(distance_basis.dtype)], dim=1)
