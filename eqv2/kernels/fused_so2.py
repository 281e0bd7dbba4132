"""The SO(2) convolutions' radial path as custom autograd nodes (eqv2/model/so2_convolution.py is the reference).

`FusedSO2Convolution` computes the same function as `SO2Convolution` with radial weights, as one autograd node
whose gradient with respect to x comes from the `eqv2::so2_input_grad` op: each order's matrix product writes
into its rows of one gradient buffer, where autograd (and Inductor) otherwise concatenate per-order
gradients (a masked pointwise kernel measured at ~1 ms per block on the H200, docs/perf-notes.md).
`indexed_radial = True` also takes the radial products of both passes, x_m * r_m and, in the backward pass,
dL/d(x_m r_m) * r_m for x and dL/d(x_m r_m) * x_m for r (summed over +m and -m), as elementwise products
over whole [E, K*C] rows with per-column index tables into the unsplit radial output: no per-order slices,
broadcasts or concatenations for the compiler to stitch together.  Their backward is not differentiable
again (gradient forces keep the reference).  The execution plan swaps the class into a built model
(`so2_fused_input_grad`, `so2_indexed_radial`; eqv2/execution.py apply_plan).
"""
from __future__ import annotations

import torch

from eqv2.model.so2_convolution import SO2Convolution, _scaled_parts
from eqv2.model.so3 import compute_dtype


class FusedSO2Convolution(SO2Convolution):
    """`SO2Convolution` with the radial path as one custom autograd node (and with `indexed_radial`, by column
    index tables); without radial weights the reference path."""

    indexed_radial = False

    @classmethod
    def swap_into(cls, conv: SO2Convolution, indexed_radial: bool) -> None:
        """Make the built `conv` (parameters and all) this class, in place, with its index tables."""
        conv.__class__ = cls
        conv.indexed_radial = indexed_radial
        if conv.radial is not None and indexed_radial:
            tables = radial_columns(conv.order_rows, conv.in_channels)
            device = conv.fc_m0.weight.device
            for name, table in zip(("radial_of_column", "plus_column", "minus_column", "paired_column"), tables):
                conv.register_buffer(name, table.to(device), persistent=False)

    def forward(self, x: torch.Tensor, edge_scalars: torch.Tensor | None):
        if self.radial is None or not torch.is_grad_enabled():
            # without autograd the custom node buys nothing (its gain is the backward pass), and Dynamo
            # cannot trace an autograd.Function's forward under no_grad (it drops ctx: torch 2.11, 2.13)
            return super().forward(x, edge_scalars)
        num_edges = x.shape[0]
        radial = self.radial(edge_scalars)  # [E, R]: per order m, the weights of x_m (shared by +m and -m)
        if self.indexed_radial:
            return self._assemble(num_edges, list(_indexed_radial_order_linears(x, radial, self)))
        weights = torch.split(radial, self.radial_widths, dim=1)
        return self._assemble(num_edges, list(_radial_order_linears(x, weights, self)))


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
