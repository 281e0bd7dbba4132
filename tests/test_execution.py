"""The execution plan (eqv2/execution.py): its automatic choice per case, its override errors, and the CPU plans
computing the reference function (outputs and gradients). CUDA plans are checked in tests/model/test_gpu.py."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from eqv2.execution import (EXECUTION_KEYS, REFERENCE, ExecutionOverrides, ExecutionPlan, apply_plan, choose_plan,
                            paper_config)
from eqv2.kernels.fused_rotation import FusedEdgeRotation
from eqv2.kernels.fused_s2_activation import FusedS2Grid
from eqv2.kernels.fused_so2 import FusedSO2Convolution
from eqv2.model.activation import S2Grid
from eqv2.model.config import ModelConfig
from eqv2.model.so2_convolution import SO2Convolution
from eqv2.model.so3 import EdgeRotation
from eqv2.model.equiformer_v2 import EquiformerV2
from tests.model.equivariance import batch_from_atoms
from tests.model.fairchem_reference import slab_structures

TINY = dict(num_layers=2, lmax=3, mmax=2, sphere_channels=8, attn_hidden_channels=8, attn_alpha_channels=8,
            attn_value_channels=4, ffn_hidden_channels=8, edge_channels=8, num_heads=2, alpha_drop=0.0,
            drop_path_rate=0.0, max_radius=6.0)


OLD_MODEL_KEYS = {"validate_inputs", "pad_atoms_multiple", "pad_edges_multiple", "so2_fused_input_grad",
                  "so2_indexed_radial", "rotation_align", "fused_rotation", "s2_kernel_form"}


def test_plan_fields_are_exactly_the_execution_keys_and_none_is_a_model_key():
    assert {f.name for f in dataclasses.fields(ExecutionPlan)} == set(EXECUTION_KEYS)
    assert {f.name for f in dataclasses.fields(ExecutionOverrides)} == set(EXECUTION_KEYS)
    assert OLD_MODEL_KEYS <= EXECUTION_KEYS  # every key the model config held before is dropped from old files
    assert not {f.name for f in dataclasses.fields(ModelConfig)} & EXECUTION_KEYS


@pytest.mark.parametrize("device_type,dtype", [("cpu", "fp32"), ("cpu", "bf16"), ("cuda", "fp32")])
def test_cpu_or_float32_gets_the_reference_modules(device_type, dtype):
    assert choose_plan(device_type=device_type, dtype=dtype, lmax=6, mmax=2) == REFERENCE


def test_cuda_half_precision_direct_forces_gets_the_fused_kernels_and_buckets():
    plan = choose_plan(device_type="cuda", dtype="bf16", lmax=6, mmax=2, zero_stage=2, graph_ahead=True)
    assert plan == ExecutionPlan(validate_inputs=False, pad_atoms_multiple=64, pad_edges_multiple=1024,
                                 so2_fused_input_grad=True, so2_indexed_radial=True, rotation_align=8,
                                 fused_rotation=True, fused_s2_activation=True, s2_kernel_form="columns")


FAST = ExecutionPlan(validate_inputs=False, pad_atoms_multiple=64, pad_edges_multiple=1024, so2_fused_input_grad=True,
                     so2_indexed_radial=True, rotation_align=8, fused_rotation=True, fused_s2_activation=True)


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_every_zero_stage_gets_the_fast_plan_up_to_lmax_8_mmax_4(zero_stage):
    """Compiled blocks run under ZeRO-3 (leaf modules), so ZeRO-3 gets the shape buckets and every kernel too,
    at every L_max <= 8 / M_max <= 4 (the 1B L8 config: 8 / 4)."""
    for lmax, mmax in [(8, 4), (6, 2), (4, 4), (2, 1)]:
        plan = choose_plan(device_type="cuda", dtype="bf16", lmax=lmax, mmax=mmax, zero_stage=zero_stage,
                           graph_ahead=True)
        assert plan == FAST, (lmax, mmax)


@pytest.mark.parametrize("lmax, mmax", [(9, 4), (8, 5), (10, 6)])
def test_triton_kernels_off_beyond_their_tested_range(lmax, mmax):
    """Beyond L_max 8 / M_max 4 the Triton kernels (fused rotation, fused S2 activation) are left off; the
    fused SO(2) input gradient (torch operations) and the shape buckets stay; an override may ask for them."""
    plan = choose_plan(device_type="cuda", dtype="bf16", lmax=lmax, mmax=mmax, zero_stage=3, graph_ahead=True)
    assert plan == dataclasses.replace(FAST, fused_rotation=False, fused_s2_activation=False)
    asked = choose_plan(device_type="cuda", dtype="bf16", lmax=lmax, mmax=mmax,
                        overrides=ExecutionOverrides(fused_rotation=True))
    assert asked.fused_rotation and not asked.fused_s2_activation


def test_gradient_forces_get_no_kernel_that_is_not_twice_differentiable():
    plan = choose_plan(device_type="cuda", dtype="bf16", lmax=6, mmax=2, forces="gradient")
    assert not plan.so2_fused_input_grad and not plan.fused_rotation and not plan.so2_indexed_radial
    assert not plan.fused_s2_activation
    assert plan.pad_atoms_multiple == 64 and plan.rotation_align == 8  # these stay: same function, any order
    with pytest.raises(ValueError, match="execution.fused_rotation: not supported with forces: gradient"):
        choose_plan(device_type="cuda", dtype="bf16", lmax=6, mmax=2, forces="gradient",
                    overrides=ExecutionOverrides.from_dict({"fused_rotation": True}))


def test_overrides_replace_single_choices():
    over = ExecutionOverrides.from_dict({"pad_atoms_multiple": 0, "s2_kernel_form": "rows", "fused_rotation": "auto"})
    plan = choose_plan(device_type="cuda", dtype="bf16", lmax=6, mmax=2, overrides=over)
    assert plan.pad_atoms_multiple == 0 and plan.s2_kernel_form == "rows" and plan.fused_rotation
    # switching the fused input gradient off drops its indexed form unless that is asked for by name
    off = choose_plan(device_type="cuda", dtype="bf16", lmax=6, mmax=2,
                      overrides=ExecutionOverrides.from_dict({"so2_fused_input_grad": False}))
    assert not off.so2_indexed_radial
    with pytest.raises(ValueError, match="so2_indexed_radial needs so2_fused_input_grad"):
        choose_plan(device_type="cpu", dtype="fp32", lmax=6, mmax=2,
                    overrides=ExecutionOverrides.from_dict({"so2_indexed_radial": True}))


@pytest.mark.parametrize("section,message", [
    ({"fused_rotations": True}, "execution: unknown key 'fused_rotations'"),
    ({"rotation_align": True}, "execution.rotation_align: expected 'auto' or a value like 1, got True"),
    ({"fused_rotation": 1}, "execution.fused_rotation: expected 'auto'"),
    ({"s2_kernel_form": "tiles"}, "execution.s2_kernel_form: expected 'auto'"),
])
def test_bad_execution_sections_are_named(section, message):
    with pytest.raises(ValueError, match=message):
        ExecutionOverrides.from_dict(section)


def test_bad_choice_inputs_and_values_are_named():
    with pytest.raises(ValueError, match="dtype must be"):
        choose_plan(device_type="cuda", dtype="float16", lmax=6, mmax=2)
    with pytest.raises(ValueError, match="execution.rotation_align must be >= 1"):
        choose_plan(device_type="cpu", dtype="fp32", lmax=6, mmax=2,
                    overrides=ExecutionOverrides.from_dict({"rotation_align": 0}))


def test_paper_config_drops_only_the_execution_keys():
    saved = {**dataclasses.asdict(ModelConfig(**TINY)), **dataclasses.asdict(ExecutionPlan(pad_atoms_multiple=64))}
    kept = paper_config(saved)
    assert set(saved) - set(kept) == set(EXECUTION_KEYS)
    assert ModelConfig(**kept) == ModelConfig(**TINY)  # loads into a config; the loading run's plan decides the rest


def test_apply_plan_swaps_the_kernel_classes_in_and_out_keeping_the_parameters():
    model = EquiformerV2(ModelConfig(**TINY))
    names = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    fast = ExecutionPlan(so2_fused_input_grad=True, so2_indexed_radial=True, fused_rotation=True,
                         fused_s2_activation=True, s2_kernel_form="rows", rotation_align=8)
    for plan, classes in ((fast, (FusedSO2Convolution, FusedS2Grid, FusedEdgeRotation)),
                          (REFERENCE, (SO2Convolution, S2Grid, EdgeRotation))):
        assert apply_plan(model, plan) is model and model.plan == plan
        convs = [m for m in model.modules() if isinstance(m, SO2Convolution)]
        grids = [m for m in model.modules() if isinstance(m, S2Grid)]
        assert convs and grids and model.rotation_type is classes[2]
        assert {type(m) for m in convs} == {classes[0]} and {type(m) for m in grids} == {classes[1]}
        assert model.rotation_align == plan.rotation_align
        assert list(model.state_dict()) == names and [id(p) for p in model.parameters()] == params
        if plan is fast:
            assert all(g.kernel_form == "rows" for g in grids)
            assert all(c.indexed_radial for c in convs if c.radial is not None)


def test_cpu_plans_compute_the_reference_function_and_gradients():
    """Every plan that runs on CPU (the fused SO(2) input gradient and its indexed form, aligned Wigner rows,
    shape buckets) against the reference modules in float64: energies, forces and parameter gradients."""
    torch.manual_seed(0)
    base = ModelConfig(**TINY)
    ref_model = apply_plan(EquiformerV2(base), REFERENCE).double()
    batch = batch_from_atoms(slab_structures(5, 2), torch.float64)
    plans = [ExecutionPlan(so2_fused_input_grad=True, so2_indexed_radial=True, rotation_align=8),
             ExecutionPlan(so2_fused_input_grad=True, rotation_align=4, pad_atoms_multiple=64, pad_edges_multiple=1024)]

    def run(model):
        model.zero_grad()
        out = model(batch)
        (out["energy"].square().sum() + out["forces"].square().sum()).backward()
        return out, [p.grad.clone() if p.grad is not None else None for p in model.parameters()]

    ref, ref_grads = run(ref_model)
    for plan in plans:
        model = apply_plan(EquiformerV2(base), plan).double()
        assert model.plan == plan and model.cfg == base  # the plan is run; the model config stays the paper's
        model.load_state_dict(ref_model.state_dict())
        out, grads = run(model)
        for key in ("energy", "forces"):
            torch.testing.assert_close(out[key], ref[key], rtol=1e-9, atol=1e-10, msg=f"{plan} {key}")
        for g, r in zip(grads, ref_grads):
            if r is not None:
                torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


def test_a_pretrained_config_from_before_the_plan_merges_without_its_kernel_keys():
    """Fine-tuning from a checkpoint whose saved model config still holds kernel and padding keys."""
    from eqv2.training.finetune import merge_model_config

    old = {**dataclasses.asdict(ModelConfig(**TINY)), "fused_rotation": True, "pad_atoms_multiple": 64,
           "so2_fused_input_grad": True, "s2_kernel_form": "rows"}
    merged = merge_model_config({"lmax": 3}, old, "ck")
    assert not set(merged) & EXECUTION_KEYS and ModelConfig(**merged) == ModelConfig(**TINY)


def test_a_model_file_from_before_the_plan_reads_as_a_pretrained_paper_config(tmp_path):
    """Fine-tuning and `eqv2 evaluate` read model files through read_pretrained: the kernel keys are dropped."""
    from eqv2.checkpoint import Normalizers, save_model
    from eqv2.training.finetune import read_pretrained

    cfg = ModelConfig(**TINY)
    save_model(tmp_path / "m.pt", EquiformerV2(cfg), cfg, Normalizers(0.0, 1.0, 1.0))
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["model_config"].update(fused_rotation=True, pad_atoms_multiple=64, rotation_align=8)
    torch.save(payload, tmp_path / "old.pt")
    pretrained = read_pretrained(str(tmp_path / "old.pt"), "ema")
    assert ModelConfig(**pretrained.model_config) == cfg
