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


def drop_path_scales(num_layers: int, graph_of_atom: torch.Tensor, num_graphs: int, rate: float, training: bool,
                     dtype: torch.dtype) -> torch.Tensor | None:
    """Stochastic depth for a whole forward pass: per-atom scales [num_layers, 2, N] for each block's
    attention and FFN updates, with one keep (1/keep) or drop (0) decision per structure; None when off.

    Drawn once, outside the blocks, so the blocks see per-atom tensors only (the structure count never
    enters a compiled block, where it would be specialised and recompiled when it changes)."""
    if rate <= 0.0 or not training:
        return None
    keep = 1.0 - rate
    rand = torch.rand(num_layers, 2, num_graphs, device=graph_of_atom.device, dtype=dtype)
    return (torch.floor(keep + rand) / keep).index_select(2, graph_of_atom)  # [L, 2, N]


def channel_dropout(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Drop whole channels of each node ([N, 1, C] mask), which keeps features equivariant."""
    if rate <= 0.0 or not training:
        return x
    mask = torch.bernoulli(torch.full((x.shape[0], 1, x.shape[2]), 1.0 - rate, device=x.device, dtype=x.dtype))
    return x * mask / (1.0 - rate)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj_drop = cfg.proj_drop
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
        drop_scale: torch.Tensor | None,
    ) -> torch.Tensor:
        """x [N, (L+1)^2, C] -> [N, (L+1)^2, C]; drop_scale [2, N] (stochastic depth, see
        `drop_path_scales`) or None."""
        update = self.attention(self.norm_1(x), atomic_numbers, distance_basis, edge_index, rotation)
        if drop_scale is not None:
            update = update * drop_scale[0].view(-1, 1, 1).to(update.dtype)
        x = x + channel_dropout(update, self.proj_drop, self.training)
        update = self.ffn(self.norm_2(x))
        if drop_scale is not None:
            update = update * drop_scale[1].view(-1, 1, 1).to(update.dtype)
        return x + update
