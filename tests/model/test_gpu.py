"""GPU checks of the model (run through the device tool): same function on CUDA as on CPU, bf16 sane, equivariant;
the compiled bf16 fast path against the eager reference; CUDA graphs, no host sync, pinned loader batches.  The
custom kernels' own CUDA checks are in tests/kernels/ (marked gpu too)."""
from __future__ import annotations

import pytest
import torch

from eqv2.execution import ExecutionPlan, apply_plan, choose_plan
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from tests.model.equivariance import batch_from_atoms, max_equivariance_error, random_rotations
from tests.model.fairchem_reference import slab_structures

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CFG = dict(num_layers=2, lmax=6, mmax=3, sphere_channels=32, attn_hidden_channels=16, attn_alpha_channels=8,
           attn_value_channels=4, ffn_hidden_channels=32, edge_channels=32, num_heads=4, alpha_drop=0.0,
           drop_path_rate=0.0)


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    """Compiled code is cached per code object for the whole process, and Dynamo allows 8 variants of
    one: tests that compile the same modules with different settings would otherwise share that budget
    (the 16th GPU test hit the limit on EdgeDegreeEmbedding.forward)."""
    torch._dynamo.reset()
    yield


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


# --- the fast path (fused S2 kernel + torch.compile, bf16) against the eager reference path


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


FAST_CFG = dict(CFG, num_layers=3)


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("fused_input_grad, rotation_align, fused_rotation, indexed_radial, s2_form",
                         [(False, 1, False, False, "rows"), (True, 8, False, False, "rows"), (True, 8, True, False, "rows"),
                          (True, 8, True, True, "rows"), (True, 8, True, True, "columns")])
def test_compiled_bf16_fast_path_matches_eager_reference_and_is_equivariant(fused_input_grad, rotation_align,
                                                                              fused_rotation, indexed_radial,
                                                                              s2_form):
    """Same weights: the fast path (compiled, fused S2 kernel, bf16; with and without the SO(2) input
    gradient op, row-aligned Wigner matrices and the fused rotation kernels) is as close to the float32 eager
    reference (the paper modules, no plan applied) as bf16 eager autocast of the reference is, for energies, forces and every gradient; and its rotation error is no larger
    than bf16 eager's (within 10 %)."""
    from eqv2.training.compile import CompileConfig, apply_compile

    torch.manual_seed(0)
    cfg = ModelConfig(**{**FAST_CFG, "max_radius": 6.0, "max_neighbors": 1000})
    ref_model = EquiformerV2(cfg).cuda().train()
    plan = ExecutionPlan(so2_fused_input_grad=fused_input_grad, rotation_align=rotation_align,
                         fused_rotation=fused_rotation, so2_indexed_radial=indexed_radial, fused_s2_activation=True,
                         s2_kernel_form=s2_form)
    fast_model = apply_plan(EquiformerV2(cfg), plan).cuda().train()
    fast_model.load_state_dict(ref_model.state_dict())
    apply_compile(fast_model, CompileConfig(enabled=True))
    results = {}
    for n in (4, 6):  # two batch shapes: the second runs the dynamic-shape compilation
        batch = batch_from_atoms(slab_structures(n, n), torch.float32).to("cuda")
        for label, model, low in (("ref", ref_model, False), ("eager_bf16", ref_model, True), ("fast", fast_model, True)):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=low):
                out = model(batch)
            (out["energy"].sum() + out["forces"].pow(2).sum()).backward()
            results[label] = (out["energy"].detach(), out["forces"].detach(), _grads(model))
        ref = results["ref"]
        for i, key in enumerate(("energy", "forces", "gradients")):
            base = _rel(results["eager_bf16"][i], ref[i])
            fast = _rel(results["fast"][i], ref[i])
            assert fast < 5e-2 and fast <= 2 * base + 1e-3, f"batch {n} {key}: fast {fast:.2e}, bf16 eager {base:.2e}"
    batch = batch_from_atoms(slab_structures(7, 3), torch.float32).to("cuda")
    rotations = random_rotations(6, seed=4).cuda().float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        base = max_equivariance_error(ref_model.eval(), batch, rotations)
        fast = max_equivariance_error(fast_model.eval(), batch, rotations)
    # bf16 itself breaks equivariance far more than any bound we could fix for a random 3-block model
    # (seen on an H200: energy 0.117, forces 0.534 relative, eager and fast alike), so the criterion is
    # relative to eager bf16; exact equivariance of the compiled code is tested in float64 below
    for key in ("energy", "forces"):
        assert fast[key] <= 1.1 * base[key] + 1e-3, (key, fast, base)


def test_compiled_model_equivariant_float64_on_gpu(oc20_atoms):
    from eqv2.training.compile import CompileConfig, apply_compile

    torch.manual_seed(0)
    model = EquiformerV2(ModelConfig(**{**CFG, "lmax": 4, "mmax": 2, "activation": "gate", "use_grid_mlp": False,
                                        "max_neighbors": 1000, "max_radius": 6.0})).double().cuda().eval()
    apply_compile(model, CompileConfig(enabled=True))
    batch = batch_from_atoms([oc20_atoms]).to("cuda")
    err = max_equivariance_error(model, batch, random_rotations(8, seed=2).cuda())
    assert err["energy"] < 1e-9 and err["forces"] < 1e-9, err


def test_cuda_graphs_over_shape_buckets_match_eager():
    """compile.mode=reduce-overhead with padded shapes: CUDA graphs replayed for forward and backward
    (with activation checkpointing on one block), fed graphs built ahead as in training, give the eager
    model's outputs and gradients (which builds its graphs itself)."""
    from eqv2.model.graph import GraphBuilder
    from eqv2.training.activation_checkpointing import ActivationCheckpointConfig, apply_activation_checkpointing
    from eqv2.training.compile import CompileConfig, apply_compile

    torch.manual_seed(0)
    base = {**FAST_CFG, "max_radius": 6.0, "max_neighbors": 1000}
    ref_model = EquiformerV2(ModelConfig(**base)).cuda().train()
    fast_model = apply_plan(EquiformerV2(ModelConfig(**base)),
                            ExecutionPlan(pad_atoms_multiple=64, pad_edges_multiple=1024)).cuda().train()
    fast_model.load_state_dict(ref_model.state_dict())
    apply_compile(fast_model, CompileConfig(enabled=True, mode="reduce-overhead"))
    apply_activation_checkpointing(fast_model, ActivationCheckpointConfig(enabled=True, every=2))
    from eqv2.buckets import pad_to_bucket

    for i, n in enumerate((4, 5, 4, 6, 5, 4)):  # shapes repeat: later steps replay recorded graphs
        batch = batch_from_atoms(slab_structures(n, n), torch.float32)
        ahead = GraphBuilder(6.0, 1000, fast_model.cfg.max_num_elements)(batch)
        if i % 2:  # the bucket built with the batch, as the loader workers do (else by the plan's hooks)
            ahead = pad_to_bucket(ahead, 64, 1024)
        ahead = ahead.to("cuda")
        results = []
        for model, inputs in ((ref_model, batch.to("cuda")), (fast_model, ahead)):
            torch.compiler.cudagraph_mark_step_begin()
            model.zero_grad(set_to_none=True)
            out = model(inputs)
            (out["energy"].sum() + out["forces"].pow(2).sum()).backward()
            results.append((out["energy"].detach().clone(), out["forces"].detach().clone(), _grads(model).clone()))
        for i, key in enumerate(("energy", "forces", "gradients")):
            err = _rel(results[1][i], results[0][i])
            assert err < 1e-4, f"batch {n} {key}: {err:.2e}"


@pytest.mark.parametrize("bucket_ahead", [False, True])
def test_training_step_with_graph_built_ahead_has_no_host_sync(bucket_ahead):
    """With the graph built in the loader (GraphBuilder) and shape buckets (built there too, or by the plan's
    hooks on the device), forward and backward of the model queue GPU work without waiting on it: torch's
    sync debug mode turns any sync into an error."""
    from eqv2.buckets import pad_to_bucket
    from eqv2.model.graph import GraphBuilder

    torch.manual_seed(0)
    cfg = ModelConfig(**{**CFG, "drop_path_rate": 0.1, "alpha_drop": 0.1})
    plan = choose_plan(device_type="cuda", dtype="bf16", lmax=cfg.lmax, mmax=cfg.mmax, graph_ahead=True)
    model = apply_plan(EquiformerV2(cfg), plan).cuda().train()  # the trainer's plan: buckets and fused kernels
    batch = GraphBuilder(cfg.max_radius, cfg.max_neighbors, cfg.max_num_elements)(
        batch_from_atoms(slab_structures(2, 4), torch.float32))
    if bucket_ahead:
        batch = pad_to_bucket(batch, plan.pad_atoms_multiple, plan.pad_edges_multiple)
    batch = batch.to("cuda")
    for sync_mode in ("default", "error"):  # the first pass initialises CUDA libraries (may sync once)
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(batch)
            (out["energy"].square().sum() + out["forces"].square().sum()).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out["forces"]).all()


def test_loader_batches_arrive_pinned_and_copy_without_blocking(tmp_path):
    """On a GPU machine the DataLoader pins each AtomsBatch (AtomsBatch.pin_memory), graph included,
    so the trainer's `to(device, non_blocking=True)` is an asynchronous copy."""
    from eqv2.data import DataConfig, TrainStream
    from eqv2.model.graph import GraphBuilder
    from tests.data.conftest import oc20_frames, with_energy, write_uneven

    from eqv2.buckets import loader_prepare

    write_uneven(tmp_path, with_energy(oc20_frames(8, seed=2)), [4, 4])
    cfg = DataConfig(train_manifest=str(tmp_path / "manifest.json"), batch_size=2, num_workers=2)
    batches = list(TrainStream(cfg, 0, 1, GraphBuilder(6.0, 20, 90)).epoch_batches(0))
    padded = list(TrainStream(cfg, 0, 1, loader_prepare(GraphBuilder(6.0, 20, 90), ExecutionPlan(
        pad_atoms_multiple=64, pad_edges_multiple=1024))).epoch_batches(0))
    assert len(batches) == len(padded) == 4
    for batch in padded:  # shape buckets built in the workers: the bucket pinned, the batch's views of it kept
        bucket = batch.bucket
        assert all(t.is_pinned() for t in vars(bucket).values() if isinstance(t, torch.Tensor))
        assert batch._views_of(bucket) and batch.pos.is_pinned()
        on_gpu = batch.to("cuda", non_blocking=True)
        assert on_gpu._views_of(on_gpu.bucket) and torch.equal(on_gpu.bucket.edge_index.cpu(), bucket.edge_index)
    for batch in batches:
        tensors = [v for v in vars(batch).values() if isinstance(v, torch.Tensor)]
        assert len(tensors) >= 8 and all(t.is_pinned() for t in tensors)
        torch.cuda.set_sync_debug_mode("error")
        try:
            on_gpu = batch.to("cuda", non_blocking=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(on_gpu.edge_index.cpu(), batch.edge_index)
