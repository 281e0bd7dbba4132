"""eSCN SO(2) convolution on rotated edge features (paper Sec. 3.3, eSCN [18]).

Once an edge is rotated onto the polar axis, an SO(3) tensor product reduces to one linear map per
order m: m = 0 coefficients (all degrees l >= 0, real) go through an ordinary linear layer; for
m > 0 the (+m, -m) pair acts as the real and imaginary part of a complex number and is multiplied
by a complex weight (W_r + i W_i), mixing degrees l >= m but not orders.  An optional radial
function of the edge scalars scales every input coefficient channel first (edge-dependent weights).

Input and output use the m-primary order of `CoefficientLayout`: [m=0 | +1 | -1 | +2 | -2 | ...].

The custom-kernel forms of the radial path (one autograd node with the input gradient from one op, the
radial products by column index tables) are in eqv2/kernels/fused_so2.py, swapped in by the execution plan.
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
            self.m_convs.append(nn.Linear(n_l * in_channels, 2 * n_l * out_channels, bias=False))
        self.radial_widths = [m0_in] + [fc.in_features for fc in self.m_convs]
        self.order_rows = [layout.m_block[0]] + [2 * n for n in layout.m_block[1:]]  # rows of x per order
        self.radial = RadialFunction(list(edge_channels) + [sum(self.radial_widths)]) if edge_channels else None
        self.reset_parameters(redraw=False)

    @torch.no_grad()
    def reset_parameters(self, redraw: bool = True) -> None:
        """Reference initialisation of the m > 0 weights: PyTorch's default, scaled by 1/sqrt(2) (real and
        imaginary parts add up).  redraw=False scales the weights as drawn at construction."""
        for fc in self.m_convs:
            if redraw:
                fc.reset_parameters()
            fc.weight.mul_(1.0 / math.sqrt(2.0))

    def forward(self, x: torch.Tensor, edge_scalars: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [E, K, C_in], edge_scalars [E, F] -> ([E, K, C_out], [E, extra] or None).

        Each order is one matrix product on a contiguous slice of x: for m > 0 the complex product
        acts on [x_{+m} | x_{-m}] through the real block matrix [[W_r, -W_i], [W_i, W_r]], whose output
        [y_{+m} | y_{-m}] is already in layout order, so no per-m slicing or stacking follows."""
        num_edges = x.shape[0]
        if self.radial is None:
            scaled = [part.reshape(num_edges, -1) for part in torch.split(x, self.order_rows, dim=1)]
        else:
            radial = self.radial(edge_scalars)  # [E, R]: per order m, the weights of x_m (shared by +m and -m)
            weights = torch.split(radial, self.radial_widths, dim=1)
            scaled = _scaled_parts(x, [w.to(x.dtype) for w in weights], self.order_rows)
        # m = 0: real coefficients of every degree; m > 0: [x_{+m} | x_{-m}] through the real block matrix
        out = [self.fc_m0(scaled[0])]  # [E, extra + (L+1)*C_out]
        for xm, complex_as_real in zip(scaled[1:], self.complex_weights()):
            out.append(torch.nn.functional.linear(xm, complex_as_real))  # [E, 2*n_l*C_out]
        return self._assemble(num_edges, out)

    def _assemble(self, num_edges: int, out: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-order outputs (order 0 with the extra scalars first) -> ([E, K, C_out], [E, extra] or None)."""
        extra = None
        if self.extra_m0_channels:
            extra = out[0].narrow(1, 0, self.extra_m0_channels)
            out[0] = out[0].narrow(1, self.extra_m0_channels, out[0].shape[1] - self.extra_m0_channels)
        return torch.cat(out, dim=1).reshape(num_edges, -1, self.out_channels), extra

    def complex_weights(self) -> list[torch.Tensor]:
        """For each m > 0 the real block matrix [[W_r, -W_i], [W_i, W_r]] [2*n_l*C_out, 2*n_l*C_in]."""
        mats = []
        for fc in self.m_convs:
            w_real, w_imag = fc.weight.chunk(2, dim=0)  # [n_l*C_out, n_l*C_in] each
            mats.append(torch.cat([torch.cat([w_real, -w_imag], 1), torch.cat([w_imag, w_real], 1)], 0))
        return mats


def _scaled_parts(x: torch.Tensor, radial, rows: list[int]) -> list[torch.Tensor]:
    """x [E, K, C] split by order and multiplied by its radial weights (shared by +m and -m):
    [E, rows_m*C] each.  One split (not per-order narrows): its backward is a single concatenation of
    the per-order gradients rather than a sum of zero-padded slices."""
    num_edges = x.shape[0]
    out = []
    for m, (part, r) in enumerate(zip(torch.split(x, rows, dim=1), radial)):
        part = part.reshape(num_edges, -1)
        out.append(part * r if m == 0 else (part.view(num_edges, 2, -1) * r.unsqueeze(1)).view(num_edges, -1))
    return out
