"""The fused S2 activation (eqv2/kernels/fused_s2_activation.py) against the einsum path, in the Triton interpreter on
CPU (float64), at L_max up to 8 / M_max 4; its FLOP count and shape checks; and in bf16 on CUDA (marked gpu, run
through the device tool), at every tile setting the autotuner may pick."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = subprocess.run([sys.executable, "-c", "import triton"], capture_output=True).returncode == 0
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


INTERPRETED = textwrap.dedent("""
    import torch
    from eqv2.model.activation import edge_grid, node_grid
    from eqv2.kernels.fused_s2_activation import s2_silu
    from eqv2.model.so3 import CoefficientLayout

    torch.manual_seed(0)
    worst = 0.0
    grids = [edge_grid(CoefficientLayout(6, 3), 18), edge_grid(CoefficientLayout(4, 2), None), node_grid(3, 12),
             edge_grid(CoefficientLayout(8, 4), 22), edge_grid(CoefficientLayout(7, 3), 16)]
    for grid in grids:
        to_mat, from_mat = grid.to_grid_mat.double(), grid.from_grid_mat.double()
        # Z*C below, at and above the 64-column tile; C not a power of two
        for (z, c), form in zip([(1, 8), (5, 24), (3, 64), (7, 20)], ["rows", "columns", "columns", "rows"]):
            x = torch.randn(z, to_mat.shape[1], c, dtype=torch.float64, requires_grad=True)
            y = s2_silu(x, to_mat, from_mat, form)
            ref = torch.einsum("gk,zgc->zkc", from_mat, torch.nn.functional.silu(torch.einsum("gk,zkc->zgc", to_mat, x)))
            dy = torch.randn_like(y)
            (g,) = torch.autograd.grad(y, x, dy)
            (g_ref,) = torch.autograd.grad(ref, x, dy)
            worst = max(worst, float((y - ref).abs().max() / ref.abs().max()),
                        float((g - g_ref).abs().max() / g_ref.abs().max()))
    # every tile setting the GPU autotuner may pick, forward and backward kernels, in both tile forms;
    # K = 37 in a block of 64
    from eqv2.kernels.fused_s2_activation import FORMS, TUNING, _launch, _s2_silu_bwd, _s2_silu_fwd
    assert FORMS == ("rows", "columns")
    to_mat, from_mat = grids[0].to_grid_mat.double(), grids[0].from_grid_mat.double()
    for config, form in [(tune, form) for tune in TUNING for form in FORMS]:
        for z, c in [(3, 24), (5, 64)]:
            x, dy = torch.randn(2, z, to_mat.shape[1], c, dtype=torch.float64)
            pre = torch.einsum("gk,zkc->zgc", to_mat, x)
            ref = torch.einsum("gk,zgc->zkc", from_mat, torch.nn.functional.silu(pre))
            s = torch.sigmoid(pre)
            d_pre = torch.einsum("gk,zkc->zgc", from_mat, dy) * s * (1 + pre * (1 - s))
            g_ref = torch.einsum("gk,zgc->zkc", to_mat, d_pre)
            y = _launch(_s2_silu_fwd, [x, to_mat, from_mat], torch.empty_like(x), to_mat, config, form)
            g = _launch(_s2_silu_bwd, [x, dy, to_mat, from_mat], torch.empty_like(x), to_mat, config, form)
            worst = max(worst, float((y - ref).abs().max() / ref.abs().max()),
                        float((g - g_ref).abs().max() / g_ref.abs().max()))
    empty = s2_silu(torch.zeros(0, to_mat.shape[1], 4, dtype=torch.float64), to_mat, from_mat)
    assert empty.shape == (0, to_mat.shape[1], 4)
    print("WORST", worst)
""")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (pip install triton) for its interpreter")
def test_fused_s2_kernel_matches_einsum_in_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = float(proc.stdout.split("WORST")[1])
    assert worst < 1e-12, worst  # float64 through the interpreter: the same sums, up to ordering


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_fused_s2_kernel_rejects_mismatched_shapes():
    from eqv2.kernels.fused_s2_activation import s2_silu

    with pytest.raises(ValueError, match="need \\[Z, K, C\\]"):
        s2_silu(torch.zeros(2, 5, 3), torch.zeros(10, 4), torch.zeros(10, 4))
    with pytest.raises(ValueError, match="dtypes differ"):
        s2_silu(torch.zeros(2, 4, 3), torch.zeros(10, 4, dtype=torch.float64), torch.zeros(10, 4))


def test_fused_s2_op_flops_are_counted_like_the_einsum_path():
    """bench/model.py reports MFU from a FLOP count: the opaque custom op must count its products."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from eqv2.kernels.fused_s2_activation import s2_silu

    z, k, c, g = 5, 29, 8, 40
    with FakeTensorMode():  # shapes only: the kernel itself needs a GPU
        x = torch.randn(z, k, c, requires_grad=True)
        to_grid, from_grid = torch.randn(g, k), torch.randn(g, k)
        with FlopCounterMode(display=False) as fused:
            s2_silu(x, to_grid, from_grid).sum().backward()
        with FlopCounterMode(display=False) as reference:
            pre = torch.einsum("gk,zkc->zgc", to_grid, x)
            torch.einsum("gk,zgc->zkc", from_grid, torch.nn.functional.silu(pre)).sum().backward()
        with FlopCounterMode(display=False) as other_form:  # the same model work in another kernel form
            s2_silu(x, to_grid, from_grid, "rows").sum().backward()
    # model FLOPs: 2 products forward, 2 backward (the kernel's recomputation is not counted)
    assert fused.get_total_flops() == reference.get_total_flops() == 4 * 2 * z * g * k * c
    assert other_form.get_total_flops() == fused.get_total_flops()


# --- on CUDA, bf16 (the device tool): against the float32 einsum path


@pytest.mark.gpu
@needs_cuda
def test_fused_s2_kernel_bf16_matches_einsum():
    from eqv2.model.activation import edge_grid
    from eqv2.kernels.fused_s2_activation import kernel_available, s2_silu
    from eqv2.model.so3 import CoefficientLayout

    grid = edge_grid(CoefficientLayout(6, 3), 18).cuda()
    to_mat, from_mat = grid.to_grid_mat.float(), grid.from_grid_mat.float()
    x = torch.randn(3001, to_mat.shape[1], 64, device="cuda")
    ref_x = x.clone().requires_grad_()
    ref = torch.einsum("gk,zgc->zkc", from_mat, torch.nn.functional.silu(torch.einsum("gk,zkc->zgc", to_mat, ref_x)))
    dy = torch.randn_like(ref)
    (ref_grad,) = torch.autograd.grad(ref, ref_x, dy)
    low_x = x.bfloat16().requires_grad_()
    assert kernel_available(low_x)
    out = s2_silu(low_x, to_mat.bfloat16(), from_mat.bfloat16())
    (grad,) = torch.autograd.grad(out, low_x, dy.bfloat16())
    assert out.dtype == torch.bfloat16
    assert _rel(out, ref) < 1e-2 and _rel(grad, ref_grad) < 1e-2, (_rel(out, ref), _rel(grad, ref_grad))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("lmax,mmax,full", [(6, 2, False), (6, 3, False), (6, 6, True), (4, 2, False),
                                              (8, 4, False), (8, 8, True), (7, 3, False)])
def test_every_s2_kernel_tile_setting_matches_einsum(lmax, mmax, full):
    """Each setting the autotuner may pick, launched explicitly at the models' coefficient counts
    (K 29, 37, 49, 19) and channel widths 64 and 128, forward and backward, in every kernel form."""
    from eqv2.model.activation import edge_grid, node_grid
    from eqv2.kernels.fused_s2_activation import FORMS, TUNING, _launch, _s2_silu_bwd, _s2_silu_fwd
    from eqv2.model.so3 import CoefficientLayout

    grid = (node_grid(lmax, 18) if full else edge_grid(CoefficientLayout(lmax, mmax), 18)).cuda()
    t, f = grid.to_grid_mat.float(), grid.from_grid_mat.float()
    for channels in (64, 128):
        x = torch.randn(2999, t.shape[1], channels, device="cuda")
        dy = torch.randn_like(x)
        ref_x = x.clone().requires_grad_()
        ref = torch.einsum("gk,zgc->zkc", f, torch.nn.functional.silu(torch.einsum("gk,zkc->zgc", t, ref_x)))
        (ref_grad,) = torch.autograd.grad(ref, ref_x, dy)
        xb, tb, fb = x.bfloat16(), t.bfloat16(), f.bfloat16()
        for config, form in [(tune, form) for tune in TUNING for form in FORMS]:
            out = _launch(_s2_silu_fwd, [xb, tb, fb], torch.empty_like(xb), tb, config, form)
            grad = _launch(_s2_silu_bwd, [xb, dy.bfloat16(), tb, fb], torch.empty_like(xb), tb, config, form)
            torch.cuda.synchronize()
            assert _rel(out, ref) < 1e-2 and _rel(grad, ref_grad) < 1e-2, (config, form, channels, _rel(out, ref))
