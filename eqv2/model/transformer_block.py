"""EquiformerV2 Transformer block (paper Sec. 4, Fig. 1): pre-norm attention and FFN, residuals.

x = x + DropPath(Attention(Norm_1(x)));  x = x + DropPath(FFN(Norm_2(x))).
Stochastic depth drops a whole structure's update (per-graph mask); `proj_drop` is an equivariant
dropout of whole channels (every m of a degree dropped together).  Both act only in training.
"""
from __future__ import annotations

import torch
from torch import nn

from eqv2.model.config import ModelConfig
from eqv2.model.feed_forward import FeedForwardNetwork
from eqv2.model.graph_attention import EquivariantGraphAttention
from eqv2.model.layer_norm import make_norm
from eqv2.model.so3 import EdgeRotation


def drop_path(x: torch.Tensor, batch: torch.Tensor, num_graphs: int, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth with one keep/drop decision per structure: x [N, K, C], batch [N]."""
    if rate <= 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = torch.floor(keep + torch.rand(num_graphs, device=x.device, dtype=x.dtype)) / keep
    return x * mask.index_select(0, batch).view(-1, 1, 1)


def channel_dropout(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Drop whole channels of each node ([N, 1, C] mask), which keeps features equivariant."""
    if rate <= 0.0 or not training:
        return x
    mask = torch.bernoulli(torch.full((x.shape[0], 1, x.shape[2]), 1.0 - rate, device=x.device, dtype=x.dtype))
    return x * mask / (1.0 - rate)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.drop_path_rate, self.proj_drop = cfg.drop_path_rate, cfg.proj_drop
        self.norm_1 = make_norm(cfg.norm_type, cfg.lmax, cfg.sphere_channels)
        self.attention = EquivariantGraphAttention(cfg, cfg.sphere_channels, cfg.alpha_drop)
        self.norm_2 = make_norm(cfg.norm_type, cfg.lmax, cfg.sphere_channels)
        self.ffn = FeedForwardNetwork(cfg, cfg.sphere_channels)

    def forward(
        self,
        x: torch.Tensor,
        atomic_numbers: torch.Tensor,
        distance_basis: torch.Tensor,
        edge_index: torch.Tensor,
        rotation: EdgeRotation,
        batch: torch.Tensor,
        num_graphs: int,
    ) -> torch.Tensor:
        """x [N, (L+1)^2, C] -> [N, (L+1)^2, C]"""
        update = self.attention(self.norm_1(x), atomic_numbers, distance_basis, edge_index, rotation)
        update = drop_path(update, batch, num_graphs, self.drop_path_rate, self.training)
        x = x + channel_dropout(update, self.proj_drop, self.training)
        update = self.ffn(self.norm_2(x))
        return x + drop_path(update, batch, num_graphs, self.drop_path_rate, self.training)
