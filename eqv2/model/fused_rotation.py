"""The edge rotation fused with the gather before it and the scatter after it (Sec. 3.3, eSCN).

The attention block rotates the features of each edge's two atoms into the edge frame and, after the
SO(2) convolutions, rotates the messages back and sums them into the target atoms.  Done with stock
operations (graph_attention.py), that is a gather writing [E, (L+1)^2, 2C] copies of node features,
a batched product reading them, and after the block a product writing [E, (L+1)^2, C] messages that a
scatter reads again: four passes over the largest tensors of the model.

Two Triton kernels remove the intermediate tensors, one program per edge and channel tile:

- `_gather_mm`:  out[e, p, c] = sum_q M[e, p, q] x[ia[e], q, c], and for the second atom of the edge
  out[e, p, C + c] from x[ib[e]] with the same matrix tile (rows gathered, multiplied, written once);
- `_mm_scatter`: out[ia[e], p, c] += sum_q M[e, p, q] y[e, q, c] (and into ib[e] from y[e, q, C + c]),
  float32 atomics.

The channel tile and warp count are autotuned on the GPU per shape (TUNING).

They make two custom ops, each the other's backward:

- `gather_rotate(x, src, dst, to_edge)`  = rotate(cat(x[src], x[dst]))         [E, K, 2C]
- `rotate_scatter(m, from_edge, dst, N)` = scatter_sum(rotate_inv(m), dst)    [N, (L+1)^2, C] float32

Products run on tensor cores in the matrices' dtype (bf16 under autocast: the gathered features are
cast to it, as `EdgeRotation.rotate` casts them) with float32 accumulation; the scatter sums in
float32 without rounding each edge's message to bf16 first.  The rotation matrices carry no gradient
(forces are predicted directly); asking for one is an error.  Used when `model.fused_rotation` is set
and the features are CUDA bf16/fp16; the tests run the kernels in Triton's interpreter on the CPU.
"""
from __future__ import annotations

import torch

from eqv2.model import fused_s2_activation
from eqv2.model.fused_s2_activation import _interpreted

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: graph_attention.py keeps to the stock operations
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
    def _mm_scatter(y_ptr, ia_ptr, ib_ptr, m_ptr, out_ptr, C, sye, syq, sme, smp, smq, son, sop,
                    P: tl.constexpr, Q: tl.constexpr, PP: tl.constexpr, QP: tl.constexpr, TWO: tl.constexpr,
                    BC: tl.constexpr):
        """out[ia[e], p, c] += sum_q M[e, p, q] y[e, q, c]; with TWO also out[ib[e], p, c] += ... y[e, q, C + c]
        (float32 or float64 atomics)."""
        e = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        p = tl.arange(0, PP)
        q = tl.arange(0, QP)
        mat = tl.load(m_ptr + e * sme + p[:, None] * smp + q[None, :] * smq,
                      mask=(p[:, None] < P) & (q[None, :] < Q), other=0.0)  # [PP, QP]
        load_mask = (q[:, None] < Q) & (c[None, :] < C)
        add_mask = (p[:, None] < P) & (c[None, :] < C)
        rows_ptr = y_ptr + e * sye + q[:, None] * syq + c[None, :]
        n = tl.load(ia_ptr + e).to(tl.int64)
        rows = tl.load(rows_ptr, mask=load_mask, other=0.0)  # [QP, BC]
        acc = tl.dot(mat, rows.to(mat.dtype))  # [PP, BC]
        tl.atomic_add(out_ptr + n * son + p[:, None] * sop + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=add_mask)
        if TWO:
            n = tl.load(ib_ptr + e).to(tl.int64)
            rows = tl.load(rows_ptr + C, mask=load_mask, other=0.0)
            acc = tl.dot(mat, rows.to(mat.dtype))
            tl.atomic_add(out_ptr + n * son + p[:, None] * sop + c[None, :], acc.to(out_ptr.dtype.element_ty),
                          mask=add_mask)


# channel tiles and warps the autotuner tries on the GPU per (P, Q, C, TWO); the interpreter (CPU tests)
# runs each explicitly
TUNING = [dict(BC=bc, num_warps=w) for bc, w in [(64, 4), (32, 4), (128, 4), (64, 2), (128, 8)]]
_tuned: dict = {}


def _autotuned(kernel, scatter: bool):
    """`kernel` under triton.autotune over TUNING (the scatter's output is zeroed before each trial)."""
    if kernel not in _tuned:
        configs = [triton.Config({"BC": t["BC"]}, num_warps=t["num_warps"]) for t in TUNING]
        _tuned[kernel] = triton.autotune(configs=configs, key=["P", "Q", "C", "TWO"],
                                         reset_to_zero=["out_ptr"] if scatter else None)(kernel)
    return _tuned[kernel]


def _run(kernel, scatter: bool, e: int, c: int, args: list, p: int, q: int, two: bool, config: dict | None):
    if e == 0:
        return
    meta = dict(P=p, Q=q, PP=_pad(p), QP=_pad(q), TWO=two)
    if config is None and not _interpreted():
        _autotuned(kernel, scatter)[lambda m: (e, triton.cdiv(c, m["BC"]))](*args, **meta)
        return
    t = config or TUNING[0]
    kernel[(e, triton.cdiv(c, t["BC"]))](*args, **meta, BC=t["BC"], num_warps=t["num_warps"])


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Scatter accumulator: float32, float64 for float64 inputs (the exactness tests)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _pad(size: int) -> int:
    return max(16, triton.next_power_of_2(size))  # tl.dot needs every dimension >= 16


def _gather(x: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor | None, m: torch.Tensor, out: torch.Tensor,
            config: dict | None = None) -> None:
    """out[e, :, :C] = m[e] @ x[ia[e]] (and out[e, :, C:] = m[e] @ x[ib[e]]); x [N, Q, C] and out
    channel-contiguous, m [E, P, Q] with any strides."""
    e, p, q = m.shape
    c = x.shape[2]
    args = [x, ia, ia if ib is None else ib, m, out, c, x.stride(0), x.stride(1), *m.stride(), out.stride(0),
            out.stride(1)]
    _run(_gather_mm, False, e, c, args, p, q, ib is not None, config)


def _scatter(y: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor | None, m: torch.Tensor, out: torch.Tensor,
             config: dict | None = None) -> None:
    """out[ia[e]] += m[e] @ y[e, :, :C] (and out[ib[e]] += m[e] @ y[e, :, C:]); y channel-contiguous,
    m [E, P, Q] with any strides, out [N, P, C] float32 (float64)."""
    e, p, q = m.shape
    c = out.shape[2]
    args = [y, ia, ia if ib is None else ib, m, out, c, y.stride(0), y.stride(1), *m.stride(), out.stride(0),
            out.stride(1)]
    _run(_mm_scatter, True, e, c, args, p, q, ib is not None, config)


def _check(name: str, features: torch.Tensor, matrices: torch.Tensor, *indices: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError(f"eqv2::{name} needs Triton (pip install triton)")
    if features.dim() != 3 or matrices.dim() != 3 or any(i.dim() != 1 or i.shape[0] != matrices.shape[0]
                                                         for i in indices):
        raise ValueError(f"{name}: features {tuple(features.shape)}, matrices {tuple(matrices.shape)}, indices "
                         f"{[tuple(i.shape) for i in indices]}: need 3-d features and matrices, one index per edge")


@torch.library.custom_op("eqv2::gather_rotate", mutates_args=())
def gather_rotate(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, to_edge: torch.Tensor) -> torch.Tensor:
    """x [N, (L+1)^2, C], src/dst [E], to_edge [E, K, (L+1)^2] -> [E, K, 2C] in to_edge's dtype:
    to_edge[e] @ x[src[e]] in channels 0..C-1 and to_edge[e] @ x[dst[e]] in channels C..2C-1."""
    _check("gather_rotate", x, to_edge, src, dst)
    x = x.contiguous()
    c = x.shape[2]
    out = x.new_empty((to_edge.shape[0], to_edge.shape[1], 2 * c), dtype=to_edge.dtype)
    _gather(x, src, dst, to_edge, out)
    return out


@gather_rotate.register_fake
def _(x, src, dst, to_edge):
    return x.new_empty((to_edge.shape[0], to_edge.shape[1], 2 * x.shape[2]), dtype=to_edge.dtype)


@torch.library.custom_op("eqv2::rotate_scatter", mutates_args=())
def rotate_scatter(m: torch.Tensor, from_edge: torch.Tensor, dst: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """m [E, K, C], from_edge [E, (L+1)^2, K], dst [E] -> [num_nodes, (L+1)^2, C] float32 (float64 for
    float64 m), the sum over
    the edges e into node dst[e] of from_edge[e] @ m[e]."""
    _check("rotate_scatter", m, from_edge, dst)
    out = m.new_zeros((num_nodes, from_edge.shape[1], m.shape[2]), dtype=_acc_dtype(m))
    _scatter(m.contiguous(), dst, None, from_edge, out)
    return out


@rotate_scatter.register_fake
def _(m, from_edge, dst, num_nodes):
    return m.new_empty((num_nodes, from_edge.shape[1], m.shape[2]), dtype=_acc_dtype(m))


@torch.library.custom_op("eqv2::gather_rotate_backward", mutates_args=())
def gather_rotate_backward(grad: torch.Tensor, to_edge: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                           num_nodes: int) -> torch.Tensor:
    """Gradient of `gather_rotate` for x, float32 [num_nodes, (L+1)^2, C]: to_edge[e]^T @ grad[e] summed
    into src[e] (first half of the channels) and dst[e] (second half)."""
    _check("gather_rotate_backward", grad, to_edge, src, dst)
    grad = grad.contiguous()
    c = grad.shape[2] // 2
    out = grad.new_zeros((num_nodes, to_edge.shape[2], c), dtype=_acc_dtype(grad))
    _scatter(grad, src, dst, to_edge.transpose(1, 2), out)
    return out


@gather_rotate_backward.register_fake
def _(grad, to_edge, src, dst, num_nodes):
    return grad.new_empty((num_nodes, to_edge.shape[2], grad.shape[2] // 2), dtype=_acc_dtype(grad))


@torch.library.custom_op("eqv2::rotate_scatter_backward", mutates_args=())
def rotate_scatter_backward(grad: torch.Tensor, from_edge: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Gradient of `rotate_scatter` for m, [E, K, C] in from_edge's dtype: from_edge[e]^T @ grad[dst[e]]."""
    _check("rotate_scatter_backward", grad, from_edge, dst)
    out = grad.new_empty((from_edge.shape[0], from_edge.shape[2], grad.shape[2]), dtype=from_edge.dtype)
    _gather(grad.contiguous(), dst, None, from_edge.transpose(1, 2), out)
    return out


@rotate_scatter_backward.register_fake
def _(grad, from_edge, dst):
    return grad.new_empty((from_edge.shape[0], from_edge.shape[2], grad.shape[2]), dtype=from_edge.dtype)


def _no_matrix_gradient(ctx, index: int, name: str) -> None:
    if ctx.needs_input_grad[index]:
        raise RuntimeError(f"eqv2::{name}: the rotation matrices carry no gradient (forces are predicted "
                           "directly); detach them or turn model.fused_rotation off")


def _gather_rotate_setup(ctx, inputs, output):
    x, src, dst, to_edge = inputs
    ctx.save_for_backward(src, dst, to_edge)
    ctx.num_nodes, ctx.x_dtype = x.shape[0], x.dtype


def _gather_rotate_grad(ctx, grad):
    _no_matrix_gradient(ctx, 3, "gather_rotate")
    src, dst, to_edge = ctx.saved_tensors
    return gather_rotate_backward(grad, to_edge, src, dst, ctx.num_nodes).to(ctx.x_dtype), None, None, None


def _rotate_scatter_setup(ctx, inputs, output):
    m, from_edge, dst, _ = inputs
    ctx.save_for_backward(from_edge, dst)
    ctx.m_dtype = m.dtype


def _rotate_scatter_grad(ctx, grad):
    _no_matrix_gradient(ctx, 1, "rotate_scatter")
    from_edge, dst = ctx.saved_tensors
    return rotate_scatter_backward(grad, from_edge, dst).to(ctx.m_dtype), None, None, None


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
