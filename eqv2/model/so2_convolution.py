"""eSCN SO(2) convolution on rotated edge features (paper Sec. 3.3, eSCN [18]).

Once an edge is rotated onto the polar axis, an SO(3) tensor product reduces to one linear map per
order m: m = 0 coefficients (all degrees l >= 0, real) go through an ordinary linear layer; for
m > 0 the (+m, -m) pair acts as the real and imaginary part of a complex number and is multiplied
by a complex weight (W_r + i W_i), mixing degrees l >= m but not orders.  An optional radial
function of the edge scalars scales every input coefficient channel first (edge-dependent weights).

Input and output use the m-primary order of `CoefficientLayout`: [m=0 | +1 | -1 | +2 | -2 | ...].

With radial weights, `fused_input_grad = True` computes the same function as one autograd node whose
gradient with respect to x comes from the `eqv2::so2_input_grad` op: each order's matrix product writes
into its rows of one gradient buffer, where autograd (and Inductor) otherwise concatenate per-order
gradients (a masked pointwise kernel measured at ~1 ms per block on the H200, docs/perf-notes.md).
`indexed_radial = True` (with it) also takes the radial products of both passes, x_m * r_m and, in the
backward pass, dL/d(x_m r_m) * r_m for x and dL/d(x_m r_m) * x_m for r (summed over +m and -m), as
elementwise products over whole [E, K*C] rows with per-column index tables into the unsplit radial
output: no per-order slices, broadcasts or concatenations for the compiler to stitch together.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from eqv2.model.radial import RadialFunction
from eqv2.model.so3 import CoefficientLayout, compute_dtype


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
        # with radial weights: the gradient with respect to x from `so2_input_grad` (one buffer written by
        # the per-order matrix products) instead of autograd's concatenation of per-order gradients
        self.fused_input_grad = False
        self.indexed_radial = False  # with fused_input_grad: the radial products by column index tables
        if self.radial is not None:
            tables = radial_columns(self.order_rows, in_channels)
            for name, table in zip(("radial_of_column", "plus_column", "minus_column", "paired_column"), tables):
                self.register_buffer(name, table, persistent=False)
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
            if self.fused_input_grad and self.indexed_radial:
                return self._assemble(num_edges, list(_indexed_radial_order_linears(x, radial, self)))
            weights = torch.split(radial, self.radial_widths, dim=1)
            if self.fused_input_grad:
                return self._assemble(num_edges, list(_radial_order_linears(x, weights, self)))
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


def _radial_order_linears(x: torch.Tensor, radial: tuple[torch.Tensor, ...], conv: SO2Convolution) -> tuple:
    """The per-order products of `SO2Convolution.forward` with radial weights, as one autograd node
    whose input gradient comes from `so2_input_grad`.  x [E, K, C_in] -> per-order outputs."""
    dtype = compute_dtype(x)
    mats = [conv.fc_m0.weight] + conv.complex_weights()
    return _RadialOrderLinears.apply(x.to(dtype), conv.fc_m0.bias.to(dtype), conv.order_rows, len(mats),
                                     *[r.to(dtype) for r in radial], *[w.to(dtype) for w in mats])


def radial_columns(order_rows: list[int], channels: int) -> tuple[torch.Tensor, ...]:
    """Index tables between the columns of x [E, K*C] (orders in m-primary layout, each order's rows
    +m first, then -m) and the columns of the radial weights [E, R] (per order m: (l_max-m+1)*C
    weights shared by +m and -m; all (l_max+1)*C for m = 0):

    radial_of_column [K*C]: the radial column that scales each column of x;
    plus_column, minus_column [R]: the columns of x each radial weight scales (+m and -m; for m = 0 the
    same column twice); paired_column [R] (bool): whether the weight has a -m column."""
    radial_of_column, plus, minus, paired = [], [], [], []
    start, radial_start = 0, 0
    for m, rows in enumerate(order_rows):
        width = rows * channels
        half = width if m == 0 else width // 2
        columns = torch.arange(half)
        radial_of_column.append(radial_start + torch.arange(width) % half)
        plus.append(start + columns)
        minus.append(start + columns + (0 if m == 0 else half))
        paired.append(torch.full((half,), m > 0))
        start, radial_start = start + width, radial_start + half
    return torch.cat(radial_of_column), torch.cat(plus), torch.cat(minus), torch.cat(paired)


def _indexed_radial_order_linears(x: torch.Tensor, radial: torch.Tensor, conv: SO2Convolution) -> tuple:
    """As `_radial_order_linears`, with the radial products by column index (`indexed_radial`):
    x [E, K, C_in], radial [E, R] -> per-order outputs."""
    dtype = compute_dtype(x)
    mats = [conv.fc_m0.weight] + conv.complex_weights()
    return _IndexedRadialOrderLinears.apply(x.to(dtype), conv.fc_m0.bias.to(dtype), radial.to(dtype),
                                            conv.radial_of_column, conv.plus_column, conv.minus_column,
                                            conv.paired_column, [rows * conv.in_channels for rows in conv.order_rows],
                                            *[w.to(dtype) for w in mats])


class _IndexedRadialOrderLinears(torch.autograd.Function):
    """forward(x, bias0, radial, radial_of_column, plus_column, minus_column, paired_column, widths, *weights)
    -> per-order outputs y_m = (x * radial[:, radial_of_column])[:, order m's columns] W_m^T."""

    @staticmethod
    def forward(ctx, x, bias0, radial, radial_of_column, plus, minus, paired, widths, *mats):
        ctx.widths = widths
        ctx.save_for_backward(x, radial, radial_of_column, plus, minus, paired, *mats)
        scaled = x.reshape(x.shape[0], -1) * radial.index_select(1, radial_of_column)  # [E, K*C]
        return tuple(torch.nn.functional.linear(s, w, bias0 if m == 0 else None)
                     for m, (s, w) in enumerate(zip(torch.split(scaled, widths, dim=1), mats)))

    @staticmethod
    def backward(ctx, *grads):
        x, radial, radial_of_column, plus, minus, paired, *mats = ctx.saved_tensors
        xf = x.reshape(x.shape[0], -1)  # [E, K*C]
        grads = [g.contiguous() for g in grads]
        grad_scaled = so2_scaled_grad(grads, list(mats))  # [E, K*C]
        r = radial.index_select(1, radial_of_column)  # [E, K*C]
        grad_x = (grad_scaled * r).view_as(x)
        scaled = xf * r
        grad_mats = [g.t().mm(s) for g, s in zip(grads, torch.split(scaled, ctx.widths, dim=1))]
        first = grad_scaled.index_select(1, plus) * xf.index_select(1, plus)  # [E, R]
        second = grad_scaled.index_select(1, minus) * xf.index_select(1, minus)
        grad_radial = torch.where(paired, first + second, first)
        return (grad_x, grads[0].sum(0), grad_radial, None, None, None, None, None, *grad_mats)


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


class _RadialOrderLinears(torch.autograd.Function):
    """forward(x, bias0, rows, orders, *radial, *weights) -> per-order outputs y_m = (x_m * r_m) W_m^T."""

    @staticmethod
    def forward(ctx, x, bias0, rows, orders, *tensors):
        radial, mats = tensors[:orders], tensors[orders:]
        ctx.rows, ctx.orders = rows, orders
        ctx.save_for_backward(x, *tensors)
        scaled = _scaled_parts(x, radial, rows)
        return tuple(torch.nn.functional.linear(s, w, bias0 if m == 0 else None)
                     for m, (s, w) in enumerate(zip(scaled, mats)))

    @staticmethod
    def backward(ctx, *grads):
        x, *tensors = ctx.saved_tensors
        orders, rows = ctx.orders, ctx.rows
        radial, mats = tensors[:orders], tensors[orders:]
        num_edges = x.shape[0]
        grads = [g.contiguous() for g in grads]
        grad_x, grad_scaled = so2_input_grad(grads, list(mats), list(radial), rows)
        scaled = _scaled_parts(x, radial, rows)
        grad_mats = [g.t().mm(s) for g, s in zip(grads, scaled)]
        grad_radial = []
        for m, (gs, part) in enumerate(zip(torch.split(grad_scaled, rows, dim=1), torch.split(x, rows, dim=1))):
            prod = (gs * part).reshape(num_edges, -1)
            grad_radial.append(prod if m == 0 else prod.view(num_edges, 2, -1).sum(1))
        return (grad_x, grads[0].sum(0), None, None, *grad_radial, *grad_mats)


@torch.library.custom_op("eqv2::so2_input_grad", mutates_args=())
def so2_input_grad(grads: list[torch.Tensor], mats: list[torch.Tensor], radial: list[torch.Tensor],
                   rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input gradients of the per-order products y_m = (x_m * r_m) W_m^T.

    grads[m] [E, out_m], mats[m] [out_m, rows_m*C], radial[m] [E, rows_m*C] (m = 0) or [E, rows_m*C/2]
    (m > 0, shared by +m and -m) -> (grad_x [E, K, C], grad_scaled [E, K, C]), K = sum(rows), the
    gradients with respect to x and to the scaled x_m * r_m.  Each order's matrix product writes straight
    into its rows of grad_scaled, and the radial weights are applied slice by slice: no concatenation
    of per-order gradients (as a fused masked kernel, that concatenation ran at a tenth of the H200's
    memory bandwidth)."""
    num_edges, total = grads[0].shape[0], sum(m.shape[1] for m in mats)
    grad_scaled = _products_into_columns(grads, mats)
    grad_x = torch.empty_like(grad_scaled)
    start = 0
    for m, (w, r) in enumerate(zip(mats, radial)):
        width = w.shape[1]
        gs, gx = grad_scaled[:, start:start + width], grad_x[:, start:start + width]
        if m == 0:
            torch.mul(gs, r, out=gx)
        else:
            torch.mul(gs.view(num_edges, 2, width // 2), r.unsqueeze(1), out=gx.view(num_edges, 2, width // 2))
        start += width
    channels = total // sum(rows)
    return grad_x.view(num_edges, -1, channels), grad_scaled.view(num_edges, -1, channels)


@torch.library.custom_op("eqv2::so2_scaled_grad", mutates_args=())
def so2_scaled_grad(grads: list[torch.Tensor], mats: list[torch.Tensor]) -> torch.Tensor:
    """grads[m] [E, out_m], mats[m] [out_m, width_m] -> [E, sum(width_m)]: the gradients with respect to
    the scaled inputs of the per-order products, each order's product written straight into its columns."""
    return _products_into_columns(grads, mats)


def _products_into_columns(grads: list[torch.Tensor], mats: list[torch.Tensor]) -> torch.Tensor:
    """[grads[0] @ mats[0] | grads[1] @ mats[1] | ...] [E, sum(width_m)], each product written into its
    columns of one buffer (no concatenation)."""
    out = grads[0].new_empty(grads[0].shape[0], sum(m.shape[1] for m in mats))
    start = 0
    for g, w in zip(grads, mats):
        torch.mm(g, w, out=out[:, start:start + w.shape[1]])
        start += w.shape[1]
    return out


@so2_scaled_grad.register_fake
def _(grads, mats):
    return grads[0].new_empty(grads[0].shape[0], sum(m.shape[1] for m in mats))


@so2_input_grad.register_fake
def _(grads, mats, radial, rows):
    num_edges, total = grads[0].shape[0], sum(m.shape[1] for m in mats)
    channels = total // sum(rows)
    out = grads[0].new_empty(num_edges, sum(rows), channels)
    return out, torch.empty_like(out)

