"""GPU checks (run through the device tool): same function on CUDA as on CPU, bf16 sane, equivariant."""
from __future__ import annotations

import pytest
import torch

from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from tests.model.equivariance import batch_from_atoms, max_equivariance_error, random_rotations
from tests.model.fairchem_reference import slab_structures

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CFG = dict(num_layers=2, lmax=6, mmax=3, sphere_channels=32, attn_hidden_channels=16, attn_alpha_channels=8,
           attn_value_channels=4, ffn_hidden_channels=32, edge_channels=32, num_heads=4, alpha_drop=0.0,
           drop_path_rate=0.0)


def test_cuda_matches_cpu_and_bf16_is_close(oc20_atoms):
    torch.manual_seed(0)
    # no neighbour cap: with max_neighbors, ties at the cut (perfect-lattice layers) may be broken
    # differently by CPU and GPU round-off, which changes the graph, not the function
    model = EquiformerV2(ModelConfig(**{**CFG, "max_radius": 6.0, "max_neighbors": 1000})).eval()
    batch = batch_from_atoms([oc20_atoms] + slab_structures(0, 5), torch.float32)
    with torch.no_grad():
        cpu = model(batch)
        gpu_model = model.cuda()
        gpu = gpu_model(batch.to("cuda"))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = gpu_model(batch.to("cuda"))
    for key in ("energy", "forces"):
        ref = cpu[key]
        fp32_err = float((gpu[key].cpu() - ref).norm() / ref.norm())
        bf16_err = float((low[key].cpu() - ref).norm() / ref.norm())
        assert low[key].dtype == torch.float32
        assert fp32_err < 1e-4 and bf16_err < 5e-2, f"{key}: fp32 {fp32_err:.2e}, bf16 {bf16_err:.2e}"


def test_cuda_equivariance_float64(oc20_atoms):
    torch.manual_seed(0)
    model = EquiformerV2(ModelConfig(**{**CFG, "lmax": 4, "mmax": 2, "activation": "gate", "use_grid_mlp": False,
                                        "max_neighbors": 1000, "max_radius": 6.0})).double().cuda().eval()
    batch = batch_from_atoms([oc20_atoms]).to("cuda")
    err = max_equivariance_error(model, batch, random_rotations(8, seed=2).cuda())
    assert err["energy"] < 1e-9 and err["forces"] < 1e-9, err


def test_gradients_finite_under_bf16():
    torch.manual_seed(0)
    model = EquiformerV2(ModelConfig(**CFG)).cuda().train()
    batch = batch_from_atoms(slab_structures(1, 4), torch.float32).to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(batch)
    (out["energy"].sum() + out["forces"].pow(2).sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
