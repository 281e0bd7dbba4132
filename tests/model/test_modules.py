"""Per-module checks: internal degree-l features transform with the model's own Wigner-D."""
from __future__ import annotations

import torch

from eqv2.model.activation import GateActivation, SeparableS2Activation, node_grid
from eqv2.model.config import ModelConfig
from eqv2.model.feed_forward import FeedForwardNetwork
from eqv2.model.graph_attention import EquivariantGraphAttention, segment_softmax
from eqv2.model.layer_norm import make_norm
from eqv2.model.so2_convolution import SO2Convolution
from eqv2.model.so3 import (CoefficientLayout, EdgeRotation, SO3Linear, WignerD, _polar_rotation, degree_index,
                            rotation_matrices, wigner_from_rotation)
from tests.model.equivariance import random_rotations

L, C = 4, 6


def features(n=5, lmax=L, c=C, seed=0):
    return torch.randn(n, (lmax + 1) ** 2, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_equivariant(fn, x, lmax=L, rotations=16, tol=1e-10):
    """fn(D x) == D fn(x) for node features x [N, (L+1)^2, C]."""
    for rot in random_rotations(rotations, seed=3):
        d = wigner_from_rotation(rot, lmax)
        lhs = fn(torch.einsum("ij,njc->nic", d, x))
        rhs = torch.einsum("ij,njc->nic", d, fn(x))
        assert (lhs - rhs).abs().max() <= tol * max(1.0, rhs.abs().max()), (lhs - rhs).abs().max()


def test_wigner_d_is_a_representation():
    r = random_rotations(6, seed=1)
    d = wigner_from_rotation(r, L)
    assert torch.allclose(d[:, 1:4, 1:4], r, atol=1e-12)  # degree 1 is the Cartesian rotation
    assert torch.allclose(wigner_from_rotation(r[:3] @ r[3:], L), d[:3] @ d[3:], atol=1e-12)
    eye = torch.eye((L + 1) ** 2, dtype=torch.float64)
    assert torch.allclose(d @ d.transpose(1, 2), eye.expand_as(d), atol=1e-12)


def test_edge_wigner_maps_edge_to_polar_axis():
    vec = torch.randn(50, 3, dtype=torch.float64)
    vec[0] = torch.tensor([0.0, 2.0, 0.0])  # exactly on the pole
    vec[1] = torch.tensor([0.0, -1.0, 1e-12])
    d = WignerD(L).double()(vec)
    unit = vec / vec.norm(dim=1, keepdim=True)
    assert torch.allclose(torch.einsum("eij,ej->ei", d[:, 1:4, 1:4], unit),
                          torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).expand(50, 3), atol=1e-12)


def test_so3_linear_and_norms_equivariant():
    x = features()
    lin = SO3Linear(C, 7, L).double()
    assert_equivariant(lin, x)
    for kind in ("layer_norm", "layer_norm_sh", "rms_norm_sh"):
        norm = make_norm(kind, L, C).double()
        with torch.no_grad():
            for p in norm.parameters():
                p.add_(0.3 * torch.randn_like(p))
        assert_equivariant(norm, x)


def test_gate_and_fine_grid_s2_activation_equivariant():
    x = features()
    degree = degree_index(L)
    gates = torch.randn(x.shape[0], L * C, dtype=torch.float64)
    gate = GateActivation(L, degree)
    assert_equivariant(lambda y: gate(gates, y), x)
    grid = node_grid(L, resolution=60).double()
    act = SeparableS2Activation()
    scalars = torch.randn(x.shape[0], C, dtype=torch.float64)
    assert_equivariant(lambda y: act(scalars, y, grid), x, tol=1e-8)


def test_feed_forward_equivariant_with_gate():
    cfg = ModelConfig(lmax=L, mmax=2, sphere_channels=C, ffn_hidden_channels=5, activation="gate", use_grid_mlp=False)
    ffn = FeedForwardNetwork(cfg, 3).double()
    assert_equivariant(ffn, features())


def test_so2_convolution_commutes_with_roll_about_the_edge():
    """In the edge frame, a rotation about the polar axis multiplies (+m, -m) pairs by a phase;
    the SO(2) convolution must commute with it."""
    layout = CoefficientLayout(L, 3)
    conv = SO2Convolution(C, 4, layout, edge_channels=[5, 8], extra_m0_channels=3).double()
    x_full = features(n=7)
    edge_scalars = torch.randn(7, 5, dtype=torch.float64)
    idx = layout.reduced_to_full
    for angle in torch.linspace(0.1, 6.0, 7, dtype=torch.float64):
        roll = torch.block_diag(*[_polar_rotation(angle, l) for l in range(L + 1)])
        rolled_in = torch.einsum("ij,njc->nic", roll, x_full)[:, idx]
        out_rolled, extra_rolled = conv(rolled_in, edge_scalars)
        out, extra = conv(x_full[:, idx], edge_scalars)
        # apply the roll to the output: embed in full coefficients (zeros for |m| > M), roll, select
        full = torch.zeros(7, (L + 1) ** 2, 4, dtype=torch.float64)
        full[:, idx] = out
        expected = torch.einsum("ij,njc->nic", roll, full)[:, idx]
        assert torch.allclose(out_rolled, expected, atol=1e-11)
        assert torch.allclose(extra_rolled, extra, atol=1e-11)  # invariant m = 0 outputs


def test_graph_attention_equivariant(oc20_atoms):
    from eqv2.model.graph import radius_graph_pbc
    from eqv2.model.radial import GaussianRadialBasis
    from tests.model.equivariance import batch_from_atoms, rotate_batch

    cfg = ModelConfig(lmax=L, mmax=2, sphere_channels=C, attn_hidden_channels=5, attn_alpha_channels=4,
                      attn_value_channels=2, num_heads=2, edge_channels=8, activation="gate", alpha_drop=0.0)
    attn = EquivariantGraphAttention(cfg, 3, alpha_drop=0.0).double().eval()
    wigner, basis, layout = WignerD(L).double(), GaussianRadialBasis(12.0).double(), CoefficientLayout(L, 2)
    batch = batch_from_atoms([oc20_atoms])
    x = features(n=len(oc20_atoms))
    rot = random_rotations(1, seed=9)[0]
    outs = []
    for b, feats in ((batch, x), (rotate_batch(batch, rot), torch.einsum("ij,njc->nic", wigner_from_rotation(rot, L), x))):
        g = radius_graph_pbc(b.pos, b.cell, b.pbc, b.natoms, 6.0, 1000)  # no ties cut
        outs.append(attn(feats, b.atomic_numbers, basis(g.distance), g.edge_index, EdgeRotation(*rotation_matrices(wigner(g.edge_vec), layout))))
    expected = torch.einsum("ij,njc->nic", wigner_from_rotation(rot, L), outs[0])
    assert torch.allclose(outs[1], expected, atol=1e-10)


def test_segment_softmax_sums_to_one_per_target():
    logits = torch.randn(10, 3) * 50
    seg = torch.tensor([0, 0, 1, 1, 1, 3, 3, 3, 3, 3])
    p = segment_softmax(logits, seg, 4)
    sums = torch.zeros(4, 3).index_add_(0, seg, p)
    assert torch.allclose(sums[[0, 1, 3]], torch.ones(3, 3), atol=1e-6) and torch.all(sums[2] == 0)


def test_segment_softmax_gradient_is_the_softmax_gradient_of_each_segment():
    """The subtracted per-target maximum is detached (as in PyG): values and gradients are those of
    torch.softmax applied to each segment on its own, float64, logits up to 1e3 apart."""
    logits = (torch.randn(10, 3, dtype=torch.float64) * 300).requires_grad_()
    seg = torch.tensor([0, 0, 1, 1, 1, 3, 3, 3, 3, 3])
    weights = torch.randn(10, 3, dtype=torch.float64)
    (grad,) = torch.autograd.grad((segment_softmax(logits, seg, 4) * weights).sum(), logits)
    ref_out = torch.cat([torch.softmax(logits[seg == s], dim=0) for s in (0, 1, 3)])
    (ref,) = torch.autograd.grad((ref_out * weights).sum(), logits)
    torch.testing.assert_close(segment_softmax(logits, seg, 4), ref_out, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-13)


def test_edge_rotation_with_aligned_rows_gives_identical_results():
    """rotation_matrices(align=8) stores its matrices as views of row-padded buffers (16-byte rows in bf16 for
    the GPU's matrix kernels): the same values, so rotations and their gradients are bit-identical."""
    from eqv2.model.so3 import CoefficientLayout, EdgeRotation, WignerD, rotation_matrices

    torch.manual_seed(0)
    layout = CoefficientLayout(6, 3)
    wigner = WignerD(6)(torch.randn(40, 3, dtype=torch.float64))
    plain = EdgeRotation(*rotation_matrices(wigner, layout))
    aligned = EdgeRotation(*rotation_matrices(wigner, layout, align=8))
    assert aligned.to_edge.shape == plain.to_edge.shape == (40, 37, 49)
    assert aligned.to_edge.stride()[1] == 56 and aligned.from_edge.stride()[1] == 40
    x = torch.randn(40, 49, 5, dtype=torch.float64, requires_grad=True)
    outs = []
    for rotation in (plain, aligned):
        y = rotation.rotate_inv(rotation.rotate(x))
        outs.append((y, *torch.autograd.grad(y.square().sum(), x)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
