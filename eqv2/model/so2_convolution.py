"""eSCN SO(2) convolution on rotated edge features (paper Sec. 3.3, eSCN [18]).

Once an edge is rotated onto the polar axis, an SO(3) tensor product reduces to one linear map per
order m: m = 0 coefficients (all degrees l >= 0, real) go through an ordinary linear layer; for
m > 0 the (+m, -m) pair acts as the real and imaginary part of a complex number and is multiplied
by a complex weight (W_r + i W_i), mixing degrees l >= m but not orders.  An optional radial
function of the edge scalars scales every input coefficient channel first (edge-dependent weights).

Input and output use the m-primary order of `CoefficientLayout`: [m=0 | +1 | -1 | +2 | -2 | ...].
"""
from __future__ import annotations

import math

import torch
from torch import nn

from eqv2.model.radial import RadialFunction
from eqv2.model.so3 import CoefficientLayout


class SO2Convolution(nn.Module):
    """[E, K, C_in] rotated features -> [E, K, C_out] (+ optional extra m=0 scalars [E, extra])."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        layout: CoefficientLayout,
        edge_channels: list[int] | None,
        extra_m0_channels: int = 0,
    ):
        """edge_channels: widths of the radial function's input and hidden layers, or None for
        edge-independent weights.  extra_m0_channels: additional invariant outputs of the m = 0
        layer (attention logits and gating scalars), returned separately."""
        super().__init__()
        self.layout = layout
        self.in_channels, self.out_channels = in_channels, out_channels
        self.extra_m0_channels = extra_m0_channels
        lmax = layout.lmax
        m0_in = (lmax + 1) * in_channels
        self.fc_m0 = nn.Linear(m0_in, extra_m0_channels + (lmax + 1) * out_channels)
        self.m_convs = nn.ModuleList()
        for m in range(1, layout.mmax + 1):
            n_l = lmax - m + 1
            fc = nn.Linear(n_l * in_channels, 2 * n_l * out_channels, bias=False)
            with torch.no_grad():
                fc.weight.mul_(1.0 / math.sqrt(2.0))  # real and imaginary parts add up
            self.m_convs.append(fc)
        self.radial_widths = [m0_in] + [fc.in_features for fc in self.m_convs]
        self.radial = RadialFunction(list(edge_channels) + [sum(self.radial_widths)]) if edge_channels else None

    def forward(self, x: torch.Tensor, edge_scalars: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [E, K, C_in], edge_scalars [E, F] -> ([E, K, C_out], [E, extra] or None).

        Each order is one matrix product on a contiguous slice of x: for m > 0 the complex product
        acts on [x_{+m} | x_{-m}] through the real block matrix [[W_r, -W_i], [W_i, W_r]], whose output
        [y_{+m} | y_{-m}] is already in layout order, so no per-m slicing or stacking follows."""
        num_edges = x.shape[0]
        blocks = self.layout.m_block
        weights = None
        if self.radial is not None:
            weights = torch.split(self.radial(edge_scalars), self.radial_widths, dim=1)
        # one split (not per-order narrows): its backward is a single concatenation of the per-order
        # gradients, which Inductor can write in place, where narrows give a sum of zero-padded slices
        parts = torch.split(x, [blocks[0]] + [2 * blocks[m] for m in range(1, len(self.m_convs) + 1)], dim=1)
        # m = 0: real coefficients of every degree
        x0 = parts[0].reshape(num_edges, -1)  # [E, (L+1)*C_in]
        if weights is not None:
            x0 = x0 * weights[0].to(x0.dtype)
        y0 = self.fc_m0(x0)
        extra = None
        if self.extra_m0_channels:
            extra = y0.narrow(1, 0, self.extra_m0_channels)
            y0 = y0.narrow(1, self.extra_m0_channels, y0.shape[1] - self.extra_m0_channels)
        out = [y0]  # [E, (L+1)*C_out]
        for m, fc in enumerate(self.m_convs, start=1):
            n_l = blocks[m]
            xm = parts[m]  # [E, 2*n_l, C_in] = [x_{+m}; x_{-m}]
            if weights is not None:
                xm = xm.reshape(num_edges, 2, n_l * self.in_channels) * weights[m].to(xm.dtype).unsqueeze(1)
            w_real, w_imag = fc.weight.chunk(2, dim=0)  # [n_l*C_out, n_l*C_in] each
            complex_as_real = torch.cat([torch.cat([w_real, -w_imag], 1), torch.cat([w_imag, w_real], 1)], 0)
            out.append(torch.nn.functional.linear(xm.reshape(num_edges, -1), complex_as_real))  # [E, 2*n_l*C_out]
        return torch.cat(out, dim=1).reshape(num_edges, -1, self.out_channels), extra
