"""The fused rotations (eqv2/kernels/fused_rotation.py) against bmm + gather / scatter, in the Triton interpreter on
CPU (float64), at L_max up to 8 / M_max 4, and the model with execution.fused_rotation against the stock path; and in
bf16 on CUDA (marked gpu, run through the device tool) against the stock bf16 operations."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = subprocess.run([sys.executable, "-c", "import triton"], capture_output=True).returncode == 0
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


FUSED_ROTATION = """
import torch
from eqv2.kernels.fused_rotation import EdgeOrder, gather_rotate, rotate_scatter
from eqv2.model.so3 import CoefficientLayout, WignerD, rotation_matrices
torch.manual_seed(0)
worst = 0.0
for lmax, mmax, n, e, c, align in [(6, 3, 7, 23, 24, 8), (4, 2, 5, 11, 64, 1), (2, 1, 3, 9, 80, 8),
                                    (8, 4, 6, 19, 24, 8), (8, 2, 4, 13, 16, 1), (5, 4, 5, 17, 40, 8)]:
    layout = CoefficientLayout(lmax, mmax)
    vec = torch.randn(e, 3, dtype=torch.float64)
    to_edge, from_edge = rotation_matrices(WignerD(lmax).double()(vec), layout, torch.float64, align)
    src, dst = torch.randint(0, n, (e,)), torch.randint(0, n, (e,))
    order = EdgeOrder.of(torch.stack([src, dst]))
    x = torch.randn(n, (lmax + 1) ** 2, c, dtype=torch.float64, requires_grad=True)
    out = gather_rotate(x, src, dst, to_edge, order.by_source, order.by_target)
    ref = torch.bmm(to_edge, torch.cat([x[src], x[dst]], dim=2))
    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(out, x, g)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    m = torch.randn(e, layout.num_reduced, c, dtype=torch.float64, requires_grad=True)
    agg = rotate_scatter(m, from_edge, dst, order.by_target, n)
    agg_ref = torch.zeros(n, (lmax + 1) ** 2, c, dtype=torch.float64).index_add(0, dst, torch.bmm(from_edge, m))
    h = torch.randn_like(agg_ref)
    (gm,) = torch.autograd.grad(agg, m, h)
    (gm_ref,) = torch.autograd.grad(agg_ref, m, h)
    for a, b in [(out, ref), (gx, gx_ref), (agg, agg_ref), (gm, gm_ref)]:
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        worst = max(worst, float((a - b).abs().max() / b.abs().max()))
# every tile setting the GPU autotuner may pick, both kernels, one and two indices; 70 edges so that
# groups cross the segmented sum's edge runs (16 to 64 edges per program), one atom with no edge
from eqv2.kernels.fused_rotation import SEGMENT_TUNING, TUNING, _gather, _scatter
layout = CoefficientLayout(4, 2)
to_edge, _ = rotation_matrices(WignerD(4).double()(torch.randn(70, 3, dtype=torch.float64)), layout, torch.float64, 8)
src, dst = torch.randint(0, 5, (70,)), torch.randint(0, 5, (70,))
dst[dst == 3] = 4
order = EdgeOrder.of(torch.stack([src, dst]))
x, y = torch.randn(5, 25, 80, dtype=torch.float64), torch.randn(70, 19, 160, dtype=torch.float64)
mt = to_edge.transpose(1, 2)
for config in TUNING:
    out = torch.empty(70, 19, 160, dtype=torch.float64)
    _gather(x, src, dst, to_edge, out, config)
    ref = torch.bmm(to_edge, torch.cat([x[src], x[dst]], dim=2))
    worst = max(worst, float((out - ref).abs().max() / ref.abs().max()))
for config in SEGMENT_TUNING:
    acc = torch.zeros(5, 25, 80, dtype=torch.float64)
    _scatter(y, src, order.by_source, dst, order.by_target, mt, acc, config)
    acc_ref = torch.zeros_like(acc).index_add(0, src, torch.bmm(mt, y[:, :, :80])).index_add(0, dst, torch.bmm(mt, y[:, :, 80:]))
    one = torch.zeros(5, 25, 80, dtype=torch.float64)
    _scatter(y[:, :, :80], dst, order.by_target, None, None, mt, one, config)
    one_ref = torch.zeros_like(one).index_add(0, dst, torch.bmm(mt, y[:, :, :80]))
    assert one[3].abs().max() == 0
    worst = max(worst, float((acc - acc_ref).abs().max() / acc_ref.abs().max()),
                float((one - one_ref).abs().max() / one_ref.abs().max()))
print("WORST", worst)
# the model with execution.fused_rotation: the interpreter serves CPU float64 tensors, so the availability
# check is widened for this process; same outputs and gradients as the stock operations
import eqv2.kernels.fused_rotation as fr
from eqv2.execution import ExecutionPlan, apply_plan
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from tests.model.equivariance import batch_from_atoms
from tests.model.fairchem_reference import slab_structures
fr.kernel_available = lambda matrices: True
results = []
for fused in (False, True):
    torch.manual_seed(0)
    model = EquiformerV2(ModelConfig(num_layers=2, lmax=3, mmax=2, sphere_channels=8, attn_hidden_channels=8,
                                     attn_alpha_channels=4, attn_value_channels=2, ffn_hidden_channels=8,
                                     edge_channels=8, num_heads=2, max_radius=5.0, alpha_drop=0.0,
                                     drop_path_rate=0.0))
    model = apply_plan(model, ExecutionPlan(rotation_align=8, fused_rotation=fused)).double()
    batch = batch_from_atoms(slab_structures(0, 2), torch.float64)
    out = model(batch)
    (out["energy"].sum() + out["forces"].pow(2).sum()).backward()
    results.append([out["energy"], out["forces"]] + [p.grad for p in model.parameters() if p.grad is not None])
model_worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(*results))
assert len(results[0]) == len(results[1]) > 100
print("MODEL", model_worst)
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (pip install triton) for its interpreter")
def test_fused_rotation_kernels_match_the_stock_operations_in_triton_interpreter():
    """gather_rotate / rotate_scatter and their backward kernels (float64, aligned matrix rows, repeated
    indices) against bmm + gather / scatter; then the model with execution.fused_rotation against the stock
    path, outputs and every gradient."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", FUSED_ROTATION], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = float(proc.stdout.split("WORST")[1].split()[0])
    model_worst = float(proc.stdout.split("MODEL")[1].split()[0])
    assert worst < 1e-13 and model_worst < 1e-12, (worst, model_worst)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("lmax,mmax", [(6, 3), (8, 4), (5, 2)])
def test_fused_rotation_kernels_bf16_match_the_stock_operations(lmax, mmax):
    """gather_rotate / rotate_scatter on tensor cores against the stock bf16 path (bmm over gathered copies,
    scatter_sum), forward and backward, at the 153M attention's sizes (L 6, M 3, aligned rows); the
    targets sorted as the graph builder returns them, the last 1,000 edges into one padding atom."""
    from eqv2.kernels.fused_rotation import EdgeOrder, gather_rotate, rotate_scatter
    from eqv2.model.so3 import CoefficientLayout, WignerD, rotation_matrices, scatter_sum

    torch.manual_seed(0)
    n, e, c = 700, 14000, 128
    layout = CoefficientLayout(lmax, mmax)
    wigner = WignerD(lmax).cuda()(torch.randn(e, 3, device="cuda"))
    to_edge, from_edge = rotation_matrices(wigner, layout, torch.bfloat16, 8)
    src, dst = torch.randint(0, n, (e,), device="cuda"), torch.randint(0, n - 1, (e,), device="cuda").sort().values
    dst[-1000:] = n - 1
    order = EdgeOrder.of(torch.stack([src, dst]))
    x = torch.randn(n, (lmax + 1) ** 2, c, device="cuda", requires_grad=True)
    out = gather_rotate(x, src, dst, to_edge, order.by_source, order.by_target)
    ref = torch.bmm(to_edge, torch.cat([x[src], x[dst]], dim=2).bfloat16())
    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(out, x, g)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    m = torch.randn(e, layout.num_reduced, c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    agg = rotate_scatter(m, from_edge, dst, order.by_target, n)
    agg_ref = scatter_sum(torch.bmm(from_edge, m), dst, n)
    h = torch.randn_like(agg_ref)
    (gm,) = torch.autograd.grad(agg, m, h)
    (gm_ref,) = torch.autograd.grad(agg_ref, m, h)
    for a, b in ((out, ref), (gx, gx_ref), (agg, agg_ref), (gm, gm_ref)):
        assert a.dtype == b.dtype and _rel(a, b) < 1e-2, (a.dtype, b.dtype, _rel(a, b))
