"""Fused S2 activation kernel: y = F^T SiLU(T x) per feature, without the sphere grid in memory (Sec. 4.1).

`activation.S2Grid.silu` computes from_grid(SiLU(to_grid(x))) for features x [Z, K, C]: T [G, K]
evaluates the K coefficients on the G = 18 x 18 sphere grid, F [G, K] projects back.  Done as two
matrix products, the grid values [Z, G, C] (G = 324, about 9x the size of x) are written, read and
kept for the backward pass: per block of the 153M model that is ~0.5 GB per saved copy at batch 8.

This Triton kernel streams over the grid in tiles of BG points: for a tile of BN (feature, channel)
columns it computes pre = T_g x, act = SiLU(pre) and accumulates F_g^T act, so only x and y touch
memory.  The backward kernel recomputes pre and forms dx = T^T (SiLU'(pre) * (F dy)).  Products run
on tensor cores with bf16/fp16 inputs and float32 accumulation (float32 inputs: float32 products);
SiLU and its derivative are evaluated in float32.  The tile sizes and warp count are autotuned on the
GPU per (K, C) at the first call (TUNING); on the H200 the untuned 64 x 64 tiles ran the 153M
attention's activation at about 94 TFLOP/s, a tenth of the chip's bf16 rate.  Two forms
(`execution.s2_kernel_form`) compute the same: tiles with a coefficient per row ("rows") or a (structure,
channel) column per row ("columns", the default: on the H200 its forward + backward took 766 us where
the rows took 865 us, at the 153M attention's K = 37, C = 64, Z = 12288; docs/perf-notes.md, session 10).

Registered as the custom ops `eqv2::s2_silu` / `eqv2::s2_silu_backward`, so torch.compile treats
them as opaque calls and autograd sees one node.  `FusedS2Grid` (below) is
swapped into a built model by the execution plan (`fused_s2_activation`, eqv2/execution.py); the einsum
path of activation.py's `S2Grid` is the reference implementation; tests compare the two (CPU via the
Triton interpreter, GPU via the device).
"""
from __future__ import annotations

import os

import torch

from eqv2.model.activation import S2Grid

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: FusedS2Grid keeps to the einsum path
    triton = None


def kernel_available(x: torch.Tensor) -> bool:
    """Whether the fused kernel serves features `x`: CUDA tensors in bf16/fp16 with Triton installed."""
    return triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


if triton is not None:

    @triton.jit
    def _tile(pid, Z, K: tl.constexpr, C: tl.constexpr, KA: tl.constexpr, BN: tl.constexpr, COLS: tl.constexpr):
        """Offsets and mask of a tile of the [Z, K, C] tensor: the coefficients 0 .. KA-1 (those < K) by the
        (z, c) pairs pid*BN .. pid*BN+BN-1; [KA, BN] (a coefficient per row), or [BN, KA] with COLS."""
        col = pid.to(tl.int64) * BN + tl.arange(0, BN)
        z = col // C
        c = col % C
        k = tl.arange(0, KA)
        if COLS:
            offs = z[:, None] * (K * C) + k[None, :] * C + c[:, None]
            mask = (k[None, :] < K) & (z[:, None] < Z)
        else:
            offs = z[None, :] * (K * C) + k[:, None] * C + c[None, :]
            mask = (k[:, None] < K) & (z[None, :] < Z)
        return offs, mask

    @triton.jit
    def _grid_rows(ptr, g, G, K: tl.constexpr, KA: tl.constexpr):
        """Columns 0 .. KA-1 of rows g of a [G, K] grid matrix: [BG, KA], zero outside."""
        k = tl.arange(0, KA)
        return tl.load(ptr + g[:, None] * K + k[None, :], mask=(g[:, None] < G) & (k[None, :] < K), other=0.0)

    @triton.jit
    def _on_grid(m, v, COLS: tl.constexpr):
        """m [BG, KA] applied to a coefficient tile v: [BG, BN] from v [KA, BN], or [BN, BG] from [BN, KA]."""
        if COLS:
            out = tl.dot(v, tl.trans(m))
        else:
            out = tl.dot(m, v)
        return out

    @triton.jit
    def _off_grid(m, a, COLS: tl.constexpr):
        """m^T [KA, BG] applied to a grid tile a: [KA, BN] from a [BG, BN], or [BN, KA] from [BN, BG]."""
        if COLS:
            out = tl.dot(a, m)
        else:
            out = tl.dot(tl.trans(m), a)
        return out

    # The K coefficients are covered by one power-of-two block of KA >= K (at least 16, the tensor-core
    # minimum).  COLS: the computation on transposed tiles [BN, KA] (a (z, c) column per row), so that
    # every product has the BN columns as its M dimension (64 or 128: Hopper's warp-group products want
    # M >= 64) and KA only as K or N; the row tiles give the output product M = KA.
    @triton.jit
    def _s2_silu_fwd(x_ptr, t_ptr, f_ptr, y_ptr, Z, G, K: tl.constexpr, C: tl.constexpr, KA: tl.constexpr,
                     COLS: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr):
        pid = tl.program_id(0)
        offs, mask = _tile(pid, Z, K, C, KA, BN, COLS)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)  # [KA, BN] ([BN, KA] with COLS)
        acc = tl.zeros(x.shape, dtype=tl.float32)
        for g0 in range(0, G, BG):
            g = g0 + tl.arange(0, BG)
            t, f = _grid_rows(t_ptr, g, G, K, KA), _grid_rows(f_ptr, g, G, K, KA)  # [BG, KA]
            pre = _on_grid(t, x, COLS)  # grid values, float32
            act = (pre * tl.sigmoid(pre)).to(t.dtype)
            acc += _off_grid(f, act, COLS)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _s2_silu_bwd(x_ptr, dy_ptr, t_ptr, f_ptr, dx_ptr, Z, G, K: tl.constexpr, C: tl.constexpr,
                     KA: tl.constexpr, COLS: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr):
        pid = tl.program_id(0)
        offs, mask = _tile(pid, Z, K, C, KA, BN, COLS)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
        acc = tl.zeros(x.shape, dtype=tl.float32)
        for g0 in range(0, G, BG):
            g = g0 + tl.arange(0, BG)
            t, f = _grid_rows(t_ptr, g, G, K, KA), _grid_rows(f_ptr, g, G, K, KA)
            pre = _on_grid(t, x, COLS)  # recomputed grid values
            d_act = _on_grid(f, dy, COLS)  # gradient on the grid
            s = tl.sigmoid(pre)
            d_pre = (d_act * s * (1.0 + pre * (1.0 - s))).to(t.dtype)
            acc += _off_grid(t, d_pre, COLS)
        tl.store(dx_ptr + offs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


# kernel forms (execution.s2_kernel_form): the tiles' orientation.  Session 9 also had the 153M attention's
# K = 37 coefficients split in two blocks (32 + 16 instead of 64): with row tiles slower on the H200
# (881 against 865 us forward + backward), with column tiles an illegal memory access in torch 2.11's
# Triton; removed (docs/perf-notes.md, session 10).
FORMS = ("rows", "columns")


# tile shapes and launch settings the autotuner tries on the GPU, per (K, C) (the first is the
# untuned setting of session 3); the Triton interpreter (CPU tests) runs each of them explicitly.
# Not BN = 32: on the H200 (torch 2.11's Triton) the (BN 32, BG 64, 4 warps) forward kernel made an
# illegal memory access at K = 37, C = 64 (the 153M attention), while the same masks at BN >= 64 are fine.
TUNING = [dict(BN=bn, BG=bg, num_warps=w) for bn, bg, w in
          [(64, 64, 4), (64, 32, 4), (128, 64, 4), (128, 32, 4), (64, 64, 8), (128, 64, 8), (128, 32, 8)]]
_tuned: dict = {}


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotuned(kernel):
    """`kernel` under triton.autotune over TUNING, keyed by the coefficient count and channel width
    (the feature count Z varies per batch and does not change the best tile); built on first use."""
    if kernel not in _tuned:
        configs = [triton.Config({"BN": t["BN"], "BG": t["BG"]}, num_warps=t["num_warps"], num_stages=3) for t in TUNING]
        _tuned[kernel] = triton.autotune(configs=configs, key=["K", "C", "KA", "COLS"])(kernel)
    return _tuned[kernel]


def _launch(kernel, tensors: list[torch.Tensor], out: torch.Tensor, to_grid: torch.Tensor,
            config: dict | None = None, form: str = "columns") -> torch.Tensor:
    """Run `kernel` into `out` [Z, K, C] in `form` (FORMS): autotuned on a GPU, or with one `config` of
    TUNING (the interpreter uses the first unless told)."""
    if form not in FORMS:
        raise ValueError(f"s2 kernel form {form!r}: expected one of {FORMS}")
    z, k, c = out.shape
    if z == 0:
        return out
    g = to_grid.shape[0]
    shape = dict(K=k, C=c, KA=max(16, triton.next_power_of_2(k)), COLS=form == "columns")
    if config is None and not _interpreted():
        _autotuned(kernel)[lambda meta: (triton.cdiv(z * c, meta["BN"]),)](*tensors, out, z, g, **shape)
        return out
    t = config or TUNING[0]
    kernel[(triton.cdiv(z * c, t["BN"]),)](*tensors, out, z, g, **shape, BG=t["BG"], BN=t["BN"],
                                           num_warps=t["num_warps"])
    return out


def _check(x: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("eqv2::s2_silu needs Triton (pip install triton)")
    if x.dim() != 3 or to_grid.shape != from_grid.shape or to_grid.shape[1] != x.shape[1]:
        raise ValueError(f"s2_silu: x {tuple(x.shape)}, to_grid {tuple(to_grid.shape)}, "
                         f"from_grid {tuple(from_grid.shape)}: need [Z, K, C], [G, K], [G, K]")
    if not (x.dtype == to_grid.dtype == from_grid.dtype):
        raise ValueError(f"s2_silu: dtypes differ: x {x.dtype}, to_grid {to_grid.dtype}, from_grid {from_grid.dtype}")


@torch.library.custom_op("eqv2::s2_silu", mutates_args=())
def s2_silu(x: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor, form: str = "columns") -> torch.Tensor:
    """x [Z, K, C], to_grid and from_grid [G, K] (same dtype) -> F^T SiLU(T x) [Z, K, C], by the kernels
    of `form` (FORMS)."""
    _check(x, to_grid, from_grid)
    x, to_grid, from_grid = x.contiguous(), to_grid.contiguous(), from_grid.contiguous()
    return _launch(_s2_silu_fwd, [x, to_grid, from_grid], torch.empty_like(x), to_grid, None, form)


@s2_silu.register_fake
def _(x, to_grid, from_grid, form="columns"):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("eqv2::s2_silu_backward", mutates_args=())
def s2_silu_backward(grad: torch.Tensor, x: torch.Tensor, to_grid: torch.Tensor,
                     from_grid: torch.Tensor, form: str = "columns") -> torch.Tensor:
    """Gradient of `s2_silu` with respect to x."""
    _check(x, to_grid, from_grid)
    grad, x = grad.contiguous().to(x.dtype), x.contiguous()
    to_grid, from_grid = to_grid.contiguous(), from_grid.contiguous()
    return _launch(_s2_silu_bwd, [x, grad, to_grid, from_grid], torch.empty_like(x), to_grid, None, form)


@s2_silu_backward.register_fake
def _(grad, x, to_grid, from_grid, form="columns"):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, to_grid, from_grid, form = inputs
    ctx.save_for_backward(x, to_grid, from_grid)
    ctx.form = form


def _backward(ctx, grad):
    x, to_grid, from_grid = ctx.saved_tensors
    # the grid matrices are constants
    return s2_silu_backward(grad, x, to_grid, from_grid, ctx.form), None, None, None


s2_silu.register_autograd(_backward, setup_context=_setup_context)


def _register_flop_formulas() -> None:
    """Count the fused op's matrix products like the einsum path's, so FLOP counters (bench/model.py's
    MFU) see the same model FLOPs as the einsum path: forward T x and F^T act (2 products of
    2*Z*G*K*C each), backward F dy and T^T d_pre (2; the kernel's recomputation of T x is not model work)."""
    from torch.utils.flop_counter import register_flop_formula

    def products(x_shape, to_grid_shape, count):
        z, k, c = x_shape
        return count * 2 * z * to_grid_shape[0] * k * c

    @register_flop_formula(torch.ops.eqv2.s2_silu)
    def _(x_shape, to_grid_shape, from_grid_shape, *args, out_shape=None, **kwargs) -> int:
        return products(x_shape, to_grid_shape, 2)

    @register_flop_formula(torch.ops.eqv2.s2_silu_backward)
    def _(grad_shape, x_shape, to_grid_shape, from_grid_shape, *args, out_shape=None, **kwargs) -> int:
        return products(x_shape, to_grid_shape, 2)


_register_flop_formulas()


class FusedS2Grid(S2Grid):
    """`activation.S2Grid` whose `silu` is the fused kernel where it serves the features (CUDA bf16/fp16, Triton
    installed), in the tile form `kernel_form`; elsewhere the reference einsums.  Its backward is not
    differentiable again: the plan does not use it with gradient forces."""

    kernel_form = "columns"

    @classmethod
    def swap_into(cls, grid: S2Grid, kernel_form: str) -> None:
        """Make the built `grid` (buffers and all) this class, in place."""
        grid.__class__ = cls
        grid.kernel_form = kernel_form

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        if kernel_available(x):
            return s2_silu(x, self.to_grid_mat.to(x.dtype), self.from_grid_mat.to(x.dtype), self.kernel_form)
        return super().silu(x)
