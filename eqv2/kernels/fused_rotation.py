"""The edge rotation fused with the gather before it and the scatter after it (Sec. 3.3, eSCN).

The attention block rotates the features of each edge's two atoms into the edge frame and, after the
SO(2) convolutions, rotates the messages back and sums them into the target atoms.  Done with stock
operations (`so3.EdgeRotation`), that is a gather writing [E, (L+1)^2, 2C] copies of node features,
a batched product reading them, and after the block a product writing [E, (L+1)^2, C] messages that a
scatter reads again: four passes over the largest tensors of the model.

Two Triton kernels remove the intermediate tensors:

- `_gather_mm` (one program per edge and channel tile): out[e, p, c] = sum_q M[e, p, q] x[ia[e], q, c],
  and for the second atom of the edge out[e, p, C + c] from x[ib[e]] with the same matrix tile (rows
  gathered, multiplied, written once);
- `_mm_segment_sum` (one program per run of edges and channel tile): out[n, p, c] = sum over the edges
  e of atom n of sum_q M[e, p, q] y[e, q, c]. The edges are taken in an order that groups them by atom
  (`EdgeOrder`: stable sorts by source and by target, once per forward pass); each program sums a run
  of consecutive edges of that order in registers and adds to the output once per atom it meets, so
  float32 atomics happen at group boundaries rather than per edge (one edge at a time, they were 3x
  slower than the gather on the H200, docs/perf-notes.md session 8).

The tiles and warp counts are autotuned on the GPU per shape (TUNING, SEGMENT_TUNING).

They make two custom ops, each the other's backward:

- `gather_rotate(x, src, dst, to_edge, src_order, dst_order)` = rotate(cat(x[src], x[dst]))  [E, K, 2C]
- `rotate_scatter(m, from_edge, dst, dst_order, N)` = scatter_sum(rotate_inv(m), dst)   [N, (L+1)^2, C] float32

Products run on tensor cores in the matrices' dtype (bf16 under autocast: the gathered features are
cast to it, as `EdgeRotation.rotate` casts them) with float32 accumulation; the scatter sums in
float32 without rounding each edge's message to bf16 first.  The rotation matrices carry no gradient
(forces are predicted directly); asking for one is an error.  `FusedEdgeRotation` (below) serves the
model's rotations when the execution plan sets `fused_rotation` (eqv2/execution.py) and the features are
CUDA bf16/fp16; the tests run the kernels in Triton's interpreter on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from eqv2.kernels import fused_s2_activation
from eqv2.kernels.fused_s2_activation import _interpreted
from eqv2.model.so3 import EdgeRotation

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: FusedEdgeRotation keeps to the stock operations
    triton = None

# the fused ops serve the same tensors as the fused S2 kernel: CUDA, bf16/fp16, Triton installed
kernel_available = fused_s2_activation.kernel_available


if triton is not None:

    @triton.jit
    def _gather_mm(x_ptr, ia_ptr, ib_ptr, m_ptr, out_ptr, C, sxn, sxq, sme, smp, smq, soe, sop,
                   P: tl.constexpr, Q: tl.constexpr, PP: tl.constexpr, QP: tl.constexpr, TWO: tl.constexpr,
                   BC: tl.constexpr):
        """out[e, p, c] = sum_q M[e, p, q] x[ia[e], q, c]; with TWO also out[e, p, C + c] from x[ib[e]]."""
        e = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        p = tl.arange(0, PP)
        q = tl.arange(0, QP)
        mat = tl.load(m_ptr + e * sme + p[:, None] * smp + q[None, :] * smq,
                      mask=(p[:, None] < P) & (q[None, :] < Q), other=0.0)  # [PP, QP], shared by both gathers
        load_mask = (q[:, None] < Q) & (c[None, :] < C)
        store_mask = (p[:, None] < P) & (c[None, :] < C)
        out = out_ptr + e * soe + p[:, None] * sop + c[None, :]
        n = tl.load(ia_ptr + e).to(tl.int64)
        rows = tl.load(x_ptr + n * sxn + q[:, None] * sxq + c[None, :], mask=load_mask, other=0.0)  # [QP, BC]
        tl.store(out, tl.dot(mat, rows.to(mat.dtype)).to(out_ptr.dtype.element_ty), mask=store_mask)
        if TWO:
            n = tl.load(ib_ptr + e).to(tl.int64)
            rows = tl.load(x_ptr + n * sxn + q[:, None] * sxq + c[None, :], mask=load_mask, other=0.0)
            tl.store(out + C, tl.dot(mat, rows.to(mat.dtype)).to(out_ptr.dtype.element_ty), mask=store_mask)

    @triton.jit
    def _segment_run(y_ptr, key_ptr, order_ptr, m_ptr, out_ptr, first, last, y_off, C, c, p, q, sye, syq, sme, smp,
                     smq, son, sop, P: tl.constexpr, Q: tl.constexpr, PP: tl.constexpr, BC: tl.constexpr):
        """out[key[e], p, c] += sum_q M[e, p, q] y[e, q, y_off + c] for e = order[first:last] (grouped by
        key): summed in registers, added to `out` (atomics) when the key changes and at the end."""
        mat_mask = (p[:, None] < P) & (q[None, :] < Q)
        load_mask = (q[:, None] < Q) & (c[None, :] < C)
        add_mask = (p[:, None] < P) & (c[None, :] < C)
        current = tl.load(key_ptr + tl.load(order_ptr + first)).to(tl.int64)
        acc = tl.zeros([PP, BC], dtype=out_ptr.dtype.element_ty)
        for k in range(first, last):
            e = tl.load(order_ptr + k).to(tl.int64)
            n = tl.load(key_ptr + e).to(tl.int64)
            if n != current:
                tl.atomic_add(out_ptr + current * son + p[:, None] * sop + c[None, :], acc, mask=add_mask)
                acc = tl.zeros([PP, BC], dtype=out_ptr.dtype.element_ty)
                current = n
            mat = tl.load(m_ptr + e * sme + p[:, None] * smp + q[None, :] * smq, mask=mat_mask, other=0.0)
            rows = tl.load(y_ptr + e * sye + q[:, None] * syq + y_off + c[None, :], mask=load_mask, other=0.0)
            acc += tl.dot(mat, rows.to(mat.dtype)).to(acc.dtype)
        tl.atomic_add(out_ptr + current * son + p[:, None] * sop + c[None, :], acc, mask=add_mask)

    @triton.jit
    def _mm_segment_sum(y_ptr, ka_ptr, oa_ptr, kb_ptr, ob_ptr, m_ptr, out_ptr, E, C, sye, syq, sme, smp, smq, son,
                        sop, P: tl.constexpr, Q: tl.constexpr, PP: tl.constexpr, QP: tl.constexpr,
                        TWO: tl.constexpr, BE: tl.constexpr, BC: tl.constexpr):
        """Program b: out[ka[e]] += M[e] @ y[e, :, :C] for e = oa[b*BE : (b+1)*BE]; with TWO also
        out[kb[e]] += M[e] @ y[e, :, C:2C] for e = ob[b*BE : (b+1)*BE]."""
        first = tl.program_id(0) * BE
        last = tl.minimum(first + BE, E)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        p = tl.arange(0, PP)
        q = tl.arange(0, QP)
        _segment_run(y_ptr, ka_ptr, oa_ptr, m_ptr, out_ptr, first, last, 0, C, c, p, q, sye, syq, sme, smp, smq,
                     son, sop, P, Q, PP, BC)
        if TWO:
            _segment_run(y_ptr, kb_ptr, ob_ptr, m_ptr, out_ptr, first, last, C, C, c, p, q, sye, syq, sme, smp,
                         smq, son, sop, P, Q, PP, BC)


@dataclass(frozen=True)
class EdgeOrder:
    """The edges grouped by source atom and by target atom: stable sorting permutations [E] of
    edge_index[0] and edge_index[1] (edges keep their order within a group), built once per forward
    pass for the segmented sums of `rotate_scatter` and of `gather_rotate`'s backward."""

    by_source: torch.Tensor  # [E] int64
    by_target: torch.Tensor  # [E] int64

    @staticmethod
    def of(edge_index: torch.Tensor) -> "EdgeOrder":
        return EdgeOrder(torch.sort(edge_index[0], stable=True).indices,
                         torch.sort(edge_index[1], stable=True).indices)


# tiles and warps the autotuner tries on the GPU per shape; the interpreter (CPU tests) runs each explicitly.
# gather: channel tile; segmented sum: edges per program and channel tile
TUNING = [dict(BC=bc, num_warps=w) for bc, w in [(64, 4), (32, 4), (128, 4), (64, 2), (128, 8)]]
SEGMENT_TUNING = [dict(BE=be, BC=bc, num_warps=w) for be, bc, w in [(64, 64, 4), (32, 64, 4), (128, 64, 4),
                                                                     (64, 128, 8), (64, 32, 2)]]
_tuned: dict = {}


def _autotuned(kernel, tuning: list[dict], reset: bool):
    """`kernel` under triton.autotune over `tuning` (with `reset`, its output is zeroed before each trial)."""
    if kernel not in _tuned:
        configs = [triton.Config({k: v for k, v in t.items() if k != "num_warps"}, num_warps=t["num_warps"])
                   for t in tuning]
        _tuned[kernel] = triton.autotune(configs=configs, key=["P", "Q", "C", "TWO"],
                                         reset_to_zero=["out_ptr"] if reset else None)(kernel)
    return _tuned[kernel]


def _unit_channel_stride(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its channels (last dimension) are contiguous, which is all the gather kernel needs
    (the attention's output projection hands its gradient over as a [N, (L+1)^2, C] view of a
    [(L+1)^2, N, C] buffer); a contiguous copy otherwise."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Scatter accumulator: float32, float64 for float64 inputs (the exactness tests)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _pad(size: int) -> int:
    return max(16, triton.next_power_of_2(size))  # tl.dot needs every dimension >= 16


def _gather(x: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor | None, m: torch.Tensor, out: torch.Tensor,
            config: dict | None = None) -> None:
    """out[e, :, :C] = m[e] @ x[ia[e]] (and out[e, :, C:] = m[e] @ x[ib[e]]); x [N, Q, C] with unit channel
    stride, out channel-contiguous, m [E, P, Q] with any strides."""
    e, p, q = m.shape
    c = x.shape[2]
    if e == 0:
        return
    args = [x, ia, ia if ib is None else ib, m, out, c, x.stride(0), x.stride(1), *m.stride(), out.stride(0),
            out.stride(1)]
    meta = dict(P=p, Q=q, PP=_pad(p), QP=_pad(q), TWO=ib is not None)
    if config is None and not _interpreted():
        _autotuned(_gather_mm, TUNING, False)[lambda t: (e, triton.cdiv(c, t["BC"]))](*args, **meta)
        return
    t = config or TUNING[0]
    _gather_mm[(e, triton.cdiv(c, t["BC"]))](*args, **meta, BC=t["BC"], num_warps=t["num_warps"])


def _scatter(y: torch.Tensor, ia: torch.Tensor, oa: torch.Tensor, ib: torch.Tensor | None, ob: torch.Tensor | None,
             m: torch.Tensor, out: torch.Tensor, config: dict | None = None) -> None:
    """out[ia[e]] += m[e] @ y[e, :, :C] (and out[ib[e]] += m[e] @ y[e, :, C:]), summed over the edges in
    the orders oa (ob) that group them by ia (ib); y channel-contiguous, m [E, P, Q] with any strides,
    out [N, P, C] float32 (float64), zeroed."""
    e, p, q = m.shape
    c = out.shape[2]
    if e == 0:
        return
    two = ib is not None
    args = [y, ia, oa, ib if two else ia, ob if two else oa, m, out, e, c, y.stride(0), y.stride(1), *m.stride(),
            out.stride(0), out.stride(1)]
    meta = dict(P=p, Q=q, PP=_pad(p), QP=_pad(q), TWO=two)
    if config is None and not _interpreted():
        grid = lambda t: (triton.cdiv(e, t["BE"]), triton.cdiv(c, t["BC"]))  # noqa: E731
        _autotuned(_mm_segment_sum, SEGMENT_TUNING, True)[grid](*args, **meta)
        return
    t = config or SEGMENT_TUNING[0]
    _mm_segment_sum[(triton.cdiv(e, t["BE"]), triton.cdiv(c, t["BC"]))](*args, **meta, BE=t["BE"], BC=t["BC"],
                                                                      num_warps=t["num_warps"])


def _check(name: str, features: torch.Tensor, matrices: torch.Tensor, *indices: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError(f"eqv2::{name} needs Triton (pip install triton)")
    if features.dim() != 3 or matrices.dim() != 3 or any(i.dim() != 1 or i.shape[0] != matrices.shape[0]
                                                         for i in indices):
        raise ValueError(f"{name}: features {tuple(features.shape)}, matrices {tuple(matrices.shape)}, indices "
                         f"{[tuple(i.shape) for i in indices]}: need 3-d features and matrices, one index per edge")


@torch.library.custom_op("eqv2::gather_rotate", mutates_args=())
def gather_rotate(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, to_edge: torch.Tensor,
                  src_order: torch.Tensor, dst_order: torch.Tensor) -> torch.Tensor:
    """x [N, (L+1)^2, C], src/dst [E], to_edge [E, K, (L+1)^2] -> [E, K, 2C] in to_edge's dtype:
    to_edge[e] @ x[src[e]] in channels 0..C-1 and to_edge[e] @ x[dst[e]] in channels C..2C-1.
    src_order/dst_order: `EdgeOrder` permutations grouping the edges by src/dst (for the backward)."""
    _check("gather_rotate", x, to_edge, src, dst, src_order, dst_order)
    x = _unit_channel_stride(x)
    c = x.shape[2]
    out = x.new_empty((to_edge.shape[0], to_edge.shape[1], 2 * c), dtype=to_edge.dtype)
    _gather(x, src, dst, to_edge, out)
    return out


@gather_rotate.register_fake
def _(x, src, dst, to_edge, src_order, dst_order):
    return x.new_empty((to_edge.shape[0], to_edge.shape[1], 2 * x.shape[2]), dtype=to_edge.dtype)


@torch.library.custom_op("eqv2::rotate_scatter", mutates_args=())
def rotate_scatter(m: torch.Tensor, from_edge: torch.Tensor, dst: torch.Tensor, dst_order: torch.Tensor,
                   num_nodes: int) -> torch.Tensor:
    """m [E, K, C], from_edge [E, (L+1)^2, K], dst [E], dst_order [E] (grouping the edges by dst) ->
    [num_nodes, (L+1)^2, C] float32 (float64 for float64 m): the sum over the edges e into node dst[e]
    of from_edge[e] @ m[e]."""
    _check("rotate_scatter", m, from_edge, dst, dst_order)
    out = m.new_zeros((num_nodes, from_edge.shape[1], m.shape[2]), dtype=_acc_dtype(m))
    _scatter(m.contiguous(), dst, dst_order, None, None, from_edge, out)
    return out


@rotate_scatter.register_fake
def _(m, from_edge, dst, dst_order, num_nodes):
    return m.new_empty((num_nodes, from_edge.shape[1], m.shape[2]), dtype=_acc_dtype(m))


@torch.library.custom_op("eqv2::gather_rotate_backward", mutates_args=())
def gather_rotate_backward(grad: torch.Tensor, to_edge: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                           src_order: torch.Tensor, dst_order: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Gradient of `gather_rotate` for x, float32 [num_nodes, (L+1)^2, C]: to_edge[e]^T @ grad[e] summed
    into src[e] (first half of the channels) and dst[e] (second half)."""
    _check("gather_rotate_backward", grad, to_edge, src, dst, src_order, dst_order)
    grad = grad.contiguous()
    c = grad.shape[2] // 2
    out = grad.new_zeros((num_nodes, to_edge.shape[2], c), dtype=_acc_dtype(grad))
    _scatter(grad, src, src_order, dst, dst_order, to_edge.transpose(1, 2), out)
    return out


@gather_rotate_backward.register_fake
def _(grad, to_edge, src, dst, src_order, dst_order, num_nodes):
    return grad.new_empty((num_nodes, to_edge.shape[2], grad.shape[2] // 2), dtype=_acc_dtype(grad))


@torch.library.custom_op("eqv2::rotate_scatter_backward", mutates_args=())
def rotate_scatter_backward(grad: torch.Tensor, from_edge: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Gradient of `rotate_scatter` for m, [E, K, C] in from_edge's dtype: from_edge[e]^T @ grad[dst[e]]."""
    _check("rotate_scatter_backward", grad, from_edge, dst)
    out = grad.new_empty((from_edge.shape[0], from_edge.shape[2], grad.shape[2]), dtype=from_edge.dtype)
    _gather(_unit_channel_stride(grad), dst, None, from_edge.transpose(1, 2), out)
    return out


@rotate_scatter_backward.register_fake
def _(grad, from_edge, dst):
    return grad.new_empty((from_edge.shape[0], from_edge.shape[2], grad.shape[2]), dtype=from_edge.dtype)


def _no_matrix_gradient(ctx, index: int, name: str) -> None:
    if ctx.needs_input_grad[index]:
        raise RuntimeError(f"eqv2::{name}: the rotation matrices carry no gradient (forces are predicted "
                           "directly); detach them or turn execution.fused_rotation off")


def _gather_rotate_setup(ctx, inputs, output):
    x, src, dst, to_edge, src_order, dst_order = inputs
    ctx.save_for_backward(src, dst, to_edge, src_order, dst_order)
    ctx.num_nodes, ctx.x_dtype = x.shape[0], x.dtype


def _gather_rotate_grad(ctx, grad):
    _no_matrix_gradient(ctx, 3, "gather_rotate")
    src, dst, to_edge, src_order, dst_order = ctx.saved_tensors
    gx = gather_rotate_backward(grad, to_edge, src, dst, src_order, dst_order, ctx.num_nodes).to(ctx.x_dtype)
    return gx, None, None, None, None, None


def _rotate_scatter_setup(ctx, inputs, output):
    m, from_edge, dst, _, _ = inputs
    ctx.save_for_backward(from_edge, dst)
    ctx.m_dtype = m.dtype


def _rotate_scatter_grad(ctx, grad):
    _no_matrix_gradient(ctx, 1, "rotate_scatter")
    from_edge, dst = ctx.saved_tensors
    return rotate_scatter_backward(grad, from_edge, dst).to(ctx.m_dtype), None, None, None, None


gather_rotate.register_autograd(_gather_rotate_grad, setup_context=_gather_rotate_setup)
rotate_scatter.register_autograd(_rotate_scatter_grad, setup_context=_rotate_scatter_setup)


def _register_flop_formulas() -> None:
    """The batched products these ops stand for, so FLOP counters see the stock path's model FLOPs."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.eqv2.gather_rotate)
    def _(x_shape, src_shape, dst_shape, m_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * m_shape[0] * m_shape[1] * m_shape[2] * 2 * x_shape[2]

    @register_flop_formula(torch.ops.eqv2.gather_rotate_backward)
    def _(grad_shape, m_shape, src_shape, dst_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * m_shape[0] * m_shape[1] * m_shape[2] * grad_shape[2]

    @register_flop_formula(torch.ops.eqv2.rotate_scatter)
    def _(m_shape, f_shape, dst_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * f_shape[0] * f_shape[1] * f_shape[2] * m_shape[2]

    @register_flop_formula(torch.ops.eqv2.rotate_scatter_backward)
    def _(grad_shape, f_shape, dst_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * f_shape[0] * f_shape[1] * f_shape[2] * grad_shape[2]


_register_flop_formulas()


class FusedEdgeRotation(EdgeRotation):
    """`so3.EdgeRotation` whose gather-rotate and rotate-scatter are the fused kernels above where they serve
    the matrices (CUDA bf16/fp16, Triton installed), else the stock operations.  The execution plan sets it as
    the model's `rotation_type` (eqv2/execution.py apply_plan); the edges' grouping by atom (`EdgeOrder`, two
    sorts) is made once per forward pass and shared by every block."""

    def __init__(self, to_edge, from_edge, order: EdgeOrder, envelope=None):
        super().__init__(to_edge, from_edge, envelope)
        self.order = order

    @classmethod
    def for_edges(cls, to_edge, from_edge, edge_index, envelope=None) -> "FusedEdgeRotation":
        return cls(to_edge, from_edge, EdgeOrder.of(edge_index), envelope)

    def gather_rotate(self, x, source, target):
        if kernel_available(self.to_edge):
            return gather_rotate(x, source, target, self.to_edge, self.order.by_source, self.order.by_target)
        return super().gather_rotate(x, source, target)

    def rotate_scatter(self, m, target, num_nodes):
        if kernel_available(self.from_edge):
            return rotate_scatter(m, self.from_edge, target, self.order.by_target, num_nodes)
        return super().rotate_scatter(m, target, num_nodes)
