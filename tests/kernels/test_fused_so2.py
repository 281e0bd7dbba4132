"""The SO(2) convolutions' radial path as custom autograd nodes (eqv2/kernels/fused_so2.py) against the reference
`SO2Convolution` (eqv2/model/so2_convolution.py), eagerly and compiled, in float64 on the CPU; its column index
tables.  The model with the plan's `so2_fused_input_grad` / `so2_indexed_radial` is checked in
tests/model/test_model.py, the compiled fast path in tests/model/test_fast_path.py."""
from __future__ import annotations

import copy

import pytest
import torch

from eqv2.kernels.fused_so2 import FusedSO2Convolution, radial_columns
from eqv2.model.so2_convolution import SO2Convolution
from eqv2.model.so3 import CoefficientLayout


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("indexed", [False, True])
def test_so2_convolution_input_gradient_op_gives_the_same_function(compiled, indexed):
    """`FusedSO2Convolution` (one autograd node whose input gradient comes from eqv2::so2_input_grad) computes
    the same outputs and gradients for x, the radial function and the weights as autograd's per-order
    path: bit-identical eagerly, and to float64 round-off when compiled with symbolic edge counts; so
    does its `indexed_radial` form (radial products by column index tables)."""
    torch.manual_seed(0)
    layout = CoefficientLayout(4, 3)
    conv = SO2Convolution(6, 5, layout, edge_channels=[10, 8], extra_m0_channels=3).double()
    fused_conv = copy.deepcopy(conv)
    FusedSO2Convolution.swap_into(fused_conv, indexed)
    forward = torch.compile(fused_conv.forward, dynamic=True, fullgraph=True) if compiled else fused_conv.forward
    for edges in (17, 29):
        x = torch.randn(edges, layout.num_reduced, 6, dtype=torch.float64, requires_grad=True)
        scalars = torch.randn(edges, 10, dtype=torch.float64)
        results = []
        for module, call in ((conv, conv.forward), (fused_conv, forward)):
            y, extra = call(x, scalars)
            loss = y.square().sum() + (extra * torch.arange(3.0, dtype=torch.float64)).sum()
            results.append((y, extra, *torch.autograd.grad(loss, [x, *module.parameters()])))
        for a, b in zip(*results):
            if compiled:
                torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
            else:
                assert torch.equal(a, b)
    if compiled:
        torch._dynamo.reset()  # compiled code is cached per code object: the next setting compiles afresh


def test_radial_column_tables_pair_every_weight_with_its_columns():
    """radial_of_column / plus / minus: every column of x is scaled by exactly one radial weight, and
    each m > 0 weight by its +m and -m columns, which lie n_l * C apart in the same order's rows."""
    layout = CoefficientLayout(6, 3)
    conv = SO2Convolution(4, 4, layout, edge_channels=[3])
    radial_of_column, plus, minus, paired = radial_columns(conv.order_rows, 4)
    assert radial_of_column.shape[0] == layout.num_reduced * 4 and plus.shape[0] == sum(conv.radial_widths)
    assert torch.equal(torch.sort(torch.cat([plus, minus[paired]])).values, torch.arange(layout.num_reduced * 4))
    assert torch.equal(radial_of_column[plus], torch.arange(plus.shape[0]))
    assert torch.equal(radial_of_column[minus], torch.arange(plus.shape[0]))
    assert not paired[: 7 * 4].any() and paired[7 * 4:].all()  # m = 0: l = 0..6 real coefficients
    assert torch.equal((minus - plus)[7 * 4: 7 * 4 + 6 * 4], torch.full((24,), 6 * 4))  # m = 1: l = 1..6
