"""Feed-forward network on node irreps features (paper Sec. 4, Fig. 1d).

SO(3) linear -> activation -> SO(3) linear.  The published models use the grid MLP: project the
hidden features to the sphere grid, apply a pointwise MLP (Linear-SiLU-Linear-SiLU-Linear, no bias)
over channels at every grid point, and project back; with separable S2 activation, degree 0 is
replaced by SiLU(Linear(x^(0))) computed from the block input.  Without the grid MLP, the
activation is a gate, an S2 activation or a separable S2 activation (Table 1a).
"""
from __future__ import annotations

from torch import nn
import torch

from eqv2.model.activation import GateActivation, S2Activation, SeparableS2Activation, node_grid
from eqv2.model.config import ModelConfig
from eqv2.model.so3 import SO3Linear, degree_index


class FeedForwardNetwork(nn.Module):
    """[N, (L+1)^2, C] -> [N, (L+1)^2, C_out]."""

    def __init__(self, cfg: ModelConfig, output_channels: int):
        super().__init__()
        c, h, lmax = cfg.sphere_channels, cfg.ffn_hidden_channels, cfg.lmax
        self.use_grid_mlp, self.activation = cfg.use_grid_mlp, cfg.activation
        self.so3_linear_1 = SO3Linear(c, h, lmax)
        self.grid = node_grid(lmax, cfg.grid_resolution) \
            if (cfg.use_grid_mlp or cfg.activation != "gate") else None
        self.scalar_mlp = None
        self.gating_linear = None
        if cfg.use_grid_mlp:
            if cfg.activation == "separable_s2":
                self.scalar_mlp = nn.Sequential(nn.Linear(c, h), nn.SiLU())
            self.grid_mlp = nn.Sequential(
                nn.Linear(h, h, bias=False), nn.SiLU(),
                nn.Linear(h, h, bias=False), nn.SiLU(),
                nn.Linear(h, h, bias=False),
            )
        elif cfg.activation == "gate":
            self.gating_linear = nn.Linear(c, lmax * h)
            self.act = GateActivation(lmax, degree_index(lmax))
        elif cfg.activation == "separable_s2":
            self.gating_linear = nn.Linear(c, h)
            self.act = SeparableS2Activation()
        else:
            self.act = S2Activation()
        self.so3_linear_2 = SO3Linear(h, output_channels, lmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scalars = x.narrow(1, 0, 1).squeeze(1)  # [N, C] degree-0 part of the input
        hidden = self.so3_linear_1(x)  # [N, (L+1)^2, H]
        if self.use_grid_mlp:
            values = self.grid_mlp(self.grid.to_grid(hidden))  # [N, G, H]
            hidden = self.grid.from_grid(values)
            if self.scalar_mlp is not None:
                first = self.scalar_mlp(scalars).unsqueeze(1)
                hidden = torch.cat([first.to(hidden.dtype), hidden.narrow(1, 1, hidden.shape[1] - 1)], dim=1)
        elif isinstance(self.act, GateActivation):
            hidden = self.act(self.gating_linear(scalars), hidden)
        elif isinstance(self.act, SeparableS2Activation):
            hidden = self.act(self.gating_linear(scalars), hidden, self.grid)
        else:
            hidden = self.act(hidden, self.grid)
        return self.so3_linear_2(hidden)
