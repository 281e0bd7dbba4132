"""The fast path on CPU: the compiled model (the kernels' own tests are in tests/kernels/).

GPU checks of the same (compiled bf16 model vs eager reference) are in test_gpu.py, those of the bf16 kernels on
tensor cores in tests/kernels/; both run through the device tool.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from eqv2.config import ConfigError
from eqv2.execution import ExecutionPlan, apply_plan
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from eqv2.training.activation_checkpointing import ActivationCheckpointConfig, apply_activation_checkpointing
from eqv2.training.compile import CompileConfig, apply_compile, saved_for_backward_bytes
from tests.model.equivariance import batch_from_atoms
from tests.model.fairchem_reference import slab_structures

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = subprocess.run([sys.executable, "-c", "import triton"], capture_output=True).returncode == 0

TINY = dict(num_layers=3, lmax=4, mmax=2, sphere_channels=16, attn_hidden_channels=8, attn_alpha_channels=8,
            attn_value_channels=4, ffn_hidden_channels=16, edge_channels=16, num_heads=2, alpha_drop=0.0,
            drop_path_rate=0.0, max_radius=6.0)


# the kernel choices of the 153M training config, all together (every custom op traced at once)
FAST_KERNELS = dict(so2_fused_input_grad=True, so2_indexed_radial=True, rotation_align=8, fused_rotation=True,
                    fused_s2_activation=True)


def _loss(out):
    return out["energy"].sum() + out["forces"].pow(2).sum()


@pytest.mark.slow
# the reference modules with Inductor's C++ wrapper launching the kernels; the fast plan's kernel choices all
# together (every custom op traced at once) with Python's wrapper.  Two cases, not the combinations: each
# compile costs a minute or more on 2 cores (the C++ wrapper with the kernels' custom ops took 520 s), and
# the reference with Python's wrapper is what tests/train/test_compiled_training.py compiles.  Each kernel's
# own numerics against the stock path, alone and in pairs, are tested eagerly in test_model.py / tests/kernels/
@pytest.mark.parametrize("cpp_wrapper,kernels", [(True, {}), (False, FAST_KERNELS)])
def test_compiled_model_matches_eager_and_compiles_once(cpp_wrapper, kernels):
    """Inductor (C++ on CPU) computes the eager model's function and gradients; with activation
    checkpointing on one block; one compiled graph per part serves every block and batch size.
    Also with Inductor's C++ wrapper launching the kernels (compile.cpp_wrapper), and with the
    kernel choices of the 153M training config (they must trace without a graph break)."""
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY, "drop_path_rate": 0.3})  # stochastic depth on: drawn outside the blocks
    eager = apply_plan(EquiformerV2(cfg), ExecutionPlan(**kernels)).train()
    fast = apply_plan(EquiformerV2(cfg), ExecutionPlan(**kernels)).train()
    fast.load_state_dict(eager.state_dict())
    names = apply_compile(fast, CompileConfig(enabled=True, cpp_wrapper=cpp_wrapper))
    apply_activation_checkpointing(fast, ActivationCheckpointConfig(enabled=True, every=2))  # wraps compiled code
    assert names == ["blocks.0", "blocks.1", "blocks.2", "edge_degree_embedding", "energy_head", "force_head",
                     "edge_frames"]
    assert list(fast.state_dict()) == list(eager.state_dict())  # checkpoints stay interchangeable
    # three batch shapes: other atom/edge counts (same structure count), then a new structure count; the parts
    # compile symbolic at the first (training.compile.BATCH_DIMS) and none recompiles for the others (the
    # trainer's batches hold varying numbers of atoms, edges and structures)
    for step, structures in enumerate([slab_structures(2, 2), slab_structures(3, 3)[1:], slab_structures(4, 4)]):
        batch = batch_from_atoms(structures, torch.float32)
        eager.zero_grad()
        fast.zero_grad()
        torch.manual_seed(step)
        ref = eager(batch)
        torch.manual_seed(step)  # the same stochastic-depth draw
        out = fast(batch)
        _loss(ref).backward()
        _loss(out).backward()
        for key in ("energy", "forces"):
            err = float((out[key] - ref[key]).norm() / ref[key].norm())
            assert err < 1e-5, (step, key, err)
        for (name, p), q in zip(fast.named_parameters(), eager.parameters()):
            if q.grad is not None and q.grad.norm() > 0:
                err = float((p.grad - q.grad).norm() / q.grad.norm())
                assert err < 1e-4, (step, name, err)
    # blocks (with and without checkpointing share the code), edge-degree embedding, 2 heads, edge frames: each
    # compiled once, with symbolic shapes (Dynamo's automatic dynamic shapes alone compiled each static first
    # and again symbolic: 10)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 5, dict(dynamo_utils.counters["stats"])


def test_compiled_fused_so2_runs_without_autograd():
    """The trainer's evaluation (and inference) runs the compiled model under no_grad.  Dynamo cannot trace
    the fused SO(2) node's forward there (an autograd.Function's forward under no_grad lost its ctx: the
    demo trainer's CUDA-graph evaluation failed in save_for_backward, 2026-12-04), so without autograd
    the convolution takes the reference path: the same outputs as eager and no graph break (every part is
    compiled fullgraph).  Training through the fused node compiled: test_compiled_model_matches_eager_...
    One block, forward only: a cold compilation of this costs ~1 min on 2 cores."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY, "num_layers": 1, "lmax": 2, "mmax": 1})  # the demo config's degrees
    plan = ExecutionPlan(so2_fused_input_grad=True, so2_indexed_radial=True)
    eager = apply_plan(EquiformerV2(cfg), plan).eval()
    fast = apply_plan(EquiformerV2(cfg), plan).eval()
    fast.load_state_dict(eager.state_dict())
    apply_compile(fast, CompileConfig(enabled=True))
    batch = batch_from_atoms(slab_structures(2, 2), torch.float32)
    with torch.no_grad():
        ref, out = eager(batch), fast(batch)
    for key in ("energy", "forces"):
        assert float((out[key] - ref[key]).norm() / ref[key].norm()) < 1e-5, key


@pytest.mark.slow
def test_activation_memory_budget_keeps_less_and_computes_the_same():
    """compile.activation_memory_budget < 1: the partitioner recomputes instead of saving; per-edge
    activations (the growth from a small to a larger batch) shrink, outputs and gradients do not change.
    The model, plan and first batch are those of test_compiled_model_matches_eager_and_compiles_once's
    kernel case, so that the budget-1 compilation is Inductor's cached one when both run in a process (a
    cold compilation costs about a minute on 2 cores); the fused S2 activation is weighed by its FLOPs."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY, "drop_path_rate": 0.3})
    eager = apply_plan(EquiformerV2(cfg), ExecutionPlan(**FAST_KERNELS)).train()
    growth, results = {}, {}
    for budget in (1.0, 0.5):
        torch._dynamo.reset()  # compiled code is cached per code object: one budget per process otherwise
        fast = apply_plan(EquiformerV2(cfg), ExecutionPlan(**FAST_KERNELS)).train()
        fast.load_state_dict(eager.state_dict())
        apply_compile(fast, CompileConfig(enabled=True, activation_memory_budget=budget))
        sizes = []
        for n in (2, 4):
            batch = batch_from_atoms(slab_structures(n, n), torch.float32)
            torch.manual_seed(n)  # the same stochastic-depth draw in every model
            saved, out = saved_for_backward_bytes(fast, batch)
            sizes.append(saved)
            fast.zero_grad()
            _loss(out).backward()
        growth[budget] = sizes[1] - sizes[0]
        results[budget] = (out["forces"].detach(), torch.cat([p.grad.flatten() for p in fast.parameters()
                                                             if p.grad is not None]))
    torch.manual_seed(n)  # the last batch's stochastic-depth draw
    ref = eager(batch)
    _loss(ref).backward()
    ref_grads = torch.cat([p.grad.flatten() for p in eager.parameters() if p.grad is not None])
    for budget, (forces, grads) in results.items():
        assert float((forces - ref["forces"]).norm() / ref["forces"].norm()) < 1e-5, budget
        assert float((grads - ref_grads).norm() / ref_grads.norm()) < 1e-4, budget
    assert growth[0.5] < 0.7 * growth[1.0], growth


def test_activation_memory_budget_range_is_checked():
    with pytest.raises(ConfigError, match="compile.activation_memory_budget must be in"):
        CompileConfig(activation_memory_budget=0.0)


def test_compile_must_precede_activation_checkpointing():
    model = EquiformerV2(ModelConfig(**TINY))
    apply_activation_checkpointing(model, ActivationCheckpointConfig(enabled=True, every=1))
    with pytest.raises(RuntimeError, match="blocks.0.forward is already wrapped"):
        apply_compile(model, CompileConfig(enabled=True))


def test_cuda_graphs_need_shape_buckets():
    with pytest.raises(ConfigError, match="execution.pad_atoms_multiple and execution.pad_edges_multiple"):
        apply_compile(EquiformerV2(ModelConfig(**TINY)), CompileConfig(enabled=True, mode="reduce-overhead"))
    padded = apply_plan(EquiformerV2(ModelConfig(**TINY)), ExecutionPlan(pad_atoms_multiple=32, pad_edges_multiple=256))
    assert len(apply_compile(padded, CompileConfig(enabled=True, mode="reduce-overhead"))) == 7  # 3 blocks, 4 parts


def test_inductor_options_keep_the_mode_and_turn_off_size_guarded_fusion():
    from eqv2.training.compile import inductor_options

    assert inductor_options("reduce-overhead")["triton.cudagraphs"] is True
    assert inductor_options("default", cpp_wrapper=True)["cpp_wrapper"] is True
    import torch._inductor.config as inductor_config
    if hasattr(inductor_config.triton, "mix_order_reduction"):  # its size checks guard on the edge count
        assert inductor_options("default")["triton.mix_order_reduction"] is False


def test_compile_config_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert CompileConfig().resolve(cuda, zero_stage=2) is True
    assert CompileConfig().resolve(cpu, zero_stage=0) is False
    assert CompileConfig().resolve(cuda, zero_stage=3) is True  # compiled blocks as ZeRO-3 leaf modules
    assert CompileConfig(enabled=True).resolve(cpu, zero_stage=3) is True
    assert CompileConfig(enabled=True).resolve(cpu) is True
    assert CompileConfig().resolve(cuda, zero_stage=3, frozen=10) is False  # frozen parameters: eager
    assert CompileConfig().resolve(cuda, zero_stage=2, frozen=10) is True
    with pytest.raises(ConfigError, match="ZeRO stage 3 and frozen parameters"):
        CompileConfig(enabled=True).resolve(cuda, zero_stage=3, frozen=10)


def test_zero3_compiles_blocks_and_heads_as_leaf_modules():
    """Under ZeRO-3 the compiled modules become DeepSpeed leaf modules (its hooks on them alone, outside the
    compiled forward); the edge frames and edge-degree embedding stay eager; frozen parameters are refused."""
    from deepspeed.utils import z3_leaf_module

    model = EquiformerV2(ModelConfig(**TINY))
    names = apply_compile(model, CompileConfig(enabled=True), zero_stage=3)
    assert names == ["blocks.0", "blocks.1", "blocks.2", "energy_head", "force_head"]
    assert {n for n, m in model.named_modules() if z3_leaf_module(m)} == set(names)
    assert "edge_frames" not in vars(model) and "forward" not in vars(model.edge_degree_embedding)
    frozen = EquiformerV2(ModelConfig(**TINY))
    frozen.atom_embedding.weight.requires_grad_(False)
    with pytest.raises(ConfigError, match="atom_embedding.weight is frozen"):
        apply_compile(frozen, CompileConfig(enabled=True), zero_stage=3)


WEIGHED = textwrap.dedent("""
    import sys
    import torch
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from eqv2.kernels.fused_s2_activation import s2_silu
    from eqv2.training.compile import _with_memory_budget

    graphs = {}
    def capture(name):
        def compiler(gm, inputs):
            graphs[name] = gm.code
            return make_boxed_func(gm.forward)
        return compiler
    def backend(gm, inputs):
        return aot_module_simplified(gm, inputs, fw_compiler=capture("fw"), bw_compiler=capture("bw"),
                                     partition_fn=min_cut_rematerialization_partition)
    torch.manual_seed(0)
    to_grid, from_grid = torch.randn(40, 16, dtype=torch.float64), torch.randn(40, 16, dtype=torch.float64)
    w1, w2 = (torch.randn(8, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    def block(x):
        y = s2_silu(torch.nn.functional.silu(x @ w1), to_grid, from_grid)
        return (torch.tanh(y) @ w2).sum()
    x = torch.randn(64, 16, 8, dtype=torch.float64, requires_grad=True)
    _with_memory_budget(torch.compile(block, backend=backend), 0.5, sys.argv[1] == "1")(x).backward()
    print("RECOMPUTED", "eqv2.s2_silu.default" in graphs["bw"])
""")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (pip install triton) for its interpreter")
@pytest.mark.parametrize("weigh, recomputed", [(True, False), (False, True)])
def test_memory_budget_weighs_the_fused_s2_op_instead_of_recomputing_it_for_free(weigh, recomputed):
    """At budget 0.5 torch's default partitioner treats custom ops as free to recompute, so the backward
    pass ran the S2 kernel a second time in every block; compile.weigh_custom_ops (default) puts it in
    the budget's knapsack by its FLOPs, where it is kept.  The partition is read from the backward graph."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", WEIGHED, "1" if weigh else "0"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"RECOMPUTED {recomputed}" in proc.stdout, proc.stdout[-2000:]
