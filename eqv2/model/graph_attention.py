"""Equivariant graph attention built on eSCN SO(2) convolutions (paper Sec. 4, Fig. 1b).

For each edge j -> i: concatenate x_i and x_j, rotate by D_ij so the edge lies on the polar axis
(keeping |m| <= M_max), apply an SO(2) convolution whose edge weights come from a radial function
of the distance and atom types.  Its extra invariant outputs give f_ij^(0) (attention logits) and
the gating scalars.  Attention re-normalisation (Sec. 4.1) applies a LayerNorm to f_ij^(0) before
the smooth leaky ReLU and the dot product with a^T; attention weights a_ij are a softmax over each
target's neighbours.  Values go through the (separable) S2 activation and a second SO(2) linear,
are weighted by a_ij per head, rotated back with D_ij^-1, summed over neighbours and projected.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from eqv2.model.activation import GateActivation, S2Activation, SeparableS2Activation, SmoothLeakyReLU, edge_grid
from eqv2.model.config import ModelConfig
from eqv2.model.radial import AtomEdgeEmbedding
from eqv2.model.so2_convolution import SO2Convolution
from eqv2.model.so3 import CoefficientLayout, EdgeRotation, SO3Linear


def segment_softmax(logits: torch.Tensor, segment: torch.Tensor, num_segments: int,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax of logits [E, H] over the edges sharing a target, computed in float32 or better; with
    `weights` [E] (the cutoff envelope), w_e exp(l_e) / sum w exp(l): an edge of weight 0 has no share.

    The per-target maximum that is subtracted for range safety is a constant to the gradient (detached,
    as in PyG's softmax that the reference uses): softmax does not depend on it, so its exact gradient
    is zero, and the backward pass of the scatter-max is skipped rather than computed as round-off."""
    dtype = logits.dtype
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    index = segment.view(-1, 1).expand_as(logits)
    peak = logits.new_full((num_segments, logits.shape[1]), float("-inf"))
    peak = peak.scatter_reduce(0, index, logits.detach(), reduce="amax", include_self=True)
    expo = torch.exp(logits - peak.index_select(0, segment))
    if weights is not None:
        expo = expo * weights.to(expo.dtype)[:, None]
    total = logits.new_zeros((num_segments, logits.shape[1])).index_add_(0, segment, expo)
    return (expo / (total.index_select(0, segment) + 1e-16)).to(dtype)


class EquivariantGraphAttention(nn.Module):
    """Multi-head equivariant graph attention: node features [N, (L+1)^2, C] -> [N, (L+1)^2, C_out]."""

    def __init__(self, cfg: ModelConfig, output_channels: int, alpha_drop: float):
        super().__init__()
        self.cfg = cfg
        self.layout = CoefficientLayout(cfg.lmax, cfg.mmax)
        self.num_heads, self.alpha_channels = cfg.num_heads, cfg.attn_alpha_channels
        self.value_channels, hidden = cfg.attn_value_channels, cfg.attn_hidden_channels
        self.edge_scalars = AtomEdgeEmbedding(cfg.max_num_elements, cfg.edge_channels, cfg.use_atom_edge_embedding)
        edge_widths = [cfg.num_distance_basis + self.edge_scalars.extra_width(), cfg.edge_channels, cfg.edge_channels]
        self.extra_gating = {"gate": cfg.lmax * hidden, "separable_s2": hidden, "s2": 0}[cfg.activation]
        self.so2_conv_1 = SO2Convolution(
            2 * cfg.sphere_channels, hidden, self.layout, edge_widths,
            extra_m0_channels=self.num_heads * self.alpha_channels + self.extra_gating,
        )
        # attention re-normalisation: LayerNorm on f_ij^(0) (Sec. 4.1); Identity for the ablation
        self.alpha_norm = nn.LayerNorm(self.alpha_channels) if cfg.use_attn_renorm else nn.Identity()
        self.alpha_act = SmoothLeakyReLU(0.2)
        bound = 1.0 / math.sqrt(self.alpha_channels)
        self.alpha_dot = nn.Parameter(torch.empty(self.num_heads, self.alpha_channels).uniform_(-bound, bound))
        self.alpha_dropout = nn.Dropout(alpha_drop) if alpha_drop > 0 else None
        if cfg.activation == "gate":
            self.act = GateActivation(cfg.lmax, self.layout.degree_of_reduced)
        elif cfg.activation == "separable_s2":
            self.act = SeparableS2Activation()
        else:
            self.act = S2Activation()
        self.grid = edge_grid(self.layout, cfg.grid_resolution) if cfg.activation != "gate" else None
        self.so2_conv_2 = SO2Convolution(hidden, self.num_heads * self.value_channels, self.layout, None)
        self.proj = SO3Linear(self.num_heads * self.value_channels, output_channels, cfg.lmax)

    def forward(
        self,
        x: torch.Tensor,
        atomic_numbers: torch.Tensor,
        distance_basis: torch.Tensor,
        edge_index: torch.Tensor,
        rotation: EdgeRotation,
    ) -> torch.Tensor:
        """x [N, (L+1)^2, C]; distance_basis [E, B]; edge_index [2, E] (source, target)."""
        source, target = edge_index[0], edge_index[1]
        edge_scalars = self.edge_scalars(distance_basis, atomic_numbers, edge_index)  # [E, F]
        num_nodes, node_dtype = x.shape[0], x.dtype
        message = rotation.gather_rotate(x, source, target)  # [E, K, 2C]
        message, extra = self.so2_conv_1(message, edge_scalars)  # [E, K, hidden], [E, H*A + gating]
        n_alpha = self.num_heads * self.alpha_channels
        alpha_features = extra.narrow(1, 0, n_alpha)
        gating = extra.narrow(1, n_alpha, extra.shape[1] - n_alpha)
        if isinstance(self.act, GateActivation):
            message = self.act(gating, message)
        elif isinstance(self.act, SeparableS2Activation):
            message = self.act(gating, message, self.grid)
        else:
            message = self.act(message, self.grid)
        message, _ = self.so2_conv_2(message, None)  # [E, K, H*V]
        # attention weights a_ij from f_ij^(0)
        alpha = self.alpha_act(self.alpha_norm(alpha_features.reshape(-1, self.num_heads, self.alpha_channels)))
        alpha = torch.einsum("ehc,hc->eh", alpha, self.alpha_dot.to(alpha.dtype))  # [E, H]
        alpha = segment_softmax(alpha, target, num_nodes, rotation.envelope)
        if self.alpha_dropout is not None:
            alpha = self.alpha_dropout(alpha)
        value = message.reshape(message.shape[0], message.shape[1], self.num_heads, self.value_channels)
        message = (value * alpha.to(value.dtype)[:, None, :, None]).reshape(message.shape)
        aggregated = rotation.rotate_scatter(message, target, num_nodes)
        aggregated = aggregated.to(node_dtype)  # [N, (L+1)^2, H*V]
        return self.proj(aggregated)
