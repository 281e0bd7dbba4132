"""Shape buckets from outside the model (eqv2/buckets.py): a model under a plan with buckets computes the same
function as the paper model (outputs and gradients, float64), whether the batch's bucket was built ahead (as
the loader workers do) or by the plan's hooks; the paper model itself pads nothing."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import eqv2.buckets
from eqv2.buckets import pad_to_bucket
from eqv2.execution import REFERENCE, ExecutionOverrides, ExecutionPlan, apply_plan, choose_plan
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from eqv2.model.graph import GraphBuilder
from tests.model.equivariance import batch_from_atoms
from tests.model.fairchem_reference import slab_structures

SMALL = dict(num_layers=2, lmax=3, mmax=2, sphere_channels=8, attn_hidden_channels=8, attn_alpha_channels=4,
             attn_value_channels=2, ffn_hidden_channels=8, edge_channels=8, num_heads=2, alpha_drop=0.0,
             drop_path_rate=0.0, max_radius=5.0, max_neighbors=12)


def _run(model, batch):
    """Outputs, parameter gradients and position gradient of a loss on every output."""
    model.zero_grad(set_to_none=True)
    pos = batch.pos.detach().clone().requires_grad_(True)
    out = model(replace(batch, pos=pos))
    sum(v.pow(2).sum() for v in out.values()).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, pos.grad


def _pair(plan: ExecutionPlan, **cfg):
    torch.manual_seed(0)
    plain = EquiformerV2(ModelConfig(**SMALL, **cfg)).double().train()
    padded = apply_plan(EquiformerV2(ModelConfig(**SMALL, **cfg)), plan).double().train()
    padded.load_state_dict(plain.state_dict())
    return plain, padded


def _assert_same(out, ref, grads=None, ref_grads=None, rtol=1e-10, atol=1e-12):
    assert out.keys() == ref.keys()
    for key in ref:
        assert out[key].shape == ref[key].shape, key
        torch.testing.assert_close(out[key], ref[key], rtol=rtol, atol=atol, msg=key)
    if grads is not None:
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("atoms_multiple, edges_multiple", [(16, 64), (7, 0), (0, 13), (1, 1)])
def test_padded_model_computes_the_same_function(atoms_multiple, edges_multiple):
    """The plan's hooks pad a batch without a graph (the model's own search) and narrow the outputs."""
    plain, padded = _pair(ExecutionPlan(pad_atoms_multiple=atoms_multiple, pad_edges_multiple=edges_multiple))
    seen = []
    padded.blocks[0].register_forward_hook(lambda m, args, out: seen.append((args[0].shape[0], args[3].shape[1])))
    batch = batch_from_atoms(slab_structures(3, 3), torch.float64)
    ref, ref_grads, ref_pos_grad = _run(plain, batch)
    out, grads, pos_grad = _run(padded, batch)
    _assert_same(out, ref, grads, ref_grads)
    torch.testing.assert_close(pos_grad, ref_pos_grad, rtol=1e-10, atol=1e-12)
    num_atoms, num_edges = seen[0]  # what the blocks ran on: the bucket
    assert num_atoms > batch.pos.shape[0] and num_atoms % max(atoms_multiple, 1) == 0
    assert num_edges % max(edges_multiple, 1) == 0


def test_bucket_built_ahead_is_used_as_it_is(monkeypatch):
    """A batch padded where it was built (GraphBuilder + pad_to_bucket, as in the loader workers): the model
    runs on that bucket, builds none, and gives the unpadded outputs and gradients."""
    plain, padded = _pair(ExecutionPlan(pad_atoms_multiple=32, pad_edges_multiple=256))
    graphs = GraphBuilder.for_model(plain.cfg)
    batch = batch_from_atoms(slab_structures(3, 2), torch.float64)
    ahead = pad_to_bucket(graphs(batch), 32, 256)
    ref, ref_grads, _ = _run(plain, batch)
    seen = []
    padded.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    monkeypatch.setattr(eqv2.buckets, "pad_to_bucket", lambda *a: pytest.fail("padded in the model's hooks"))
    padded.zero_grad(set_to_none=True)
    out = padded(ahead)
    sum(v.pow(2).sum() for v in out.values()).backward()
    assert seen == [ahead.bucket.pos.shape[0]] and seen[0] % 32 == 0
    _assert_same(out, ref, {n: p.grad for n, p in padded.named_parameters() if p.grad is not None}, ref_grads)


def test_paper_model_computes_the_dummy_structure_like_any_other():
    """No padding code in the model: given a bucket without the plan's hooks it returns one row per
    structure and atom of it, the dummy's too, and the real rows are the unpadded outputs."""
    plain, _ = _pair(REFERENCE)
    batch = GraphBuilder.for_model(plain.cfg)(batch_from_atoms(slab_structures(3, 2), torch.float64))
    bucket = pad_to_bucket(batch, 16, 64).bucket
    with torch.no_grad():
        ref, out = plain(batch), plain(bucket)
    assert out["energy"].shape == (3,) and out["forces"].shape == bucket.pos.shape
    torch.testing.assert_close(out["energy"][:2], ref["energy"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["forces"][: batch.pos.shape[0]], ref["forces"], rtol=1e-10, atol=1e-12)


def test_gradient_forces_and_stress_are_unchanged_by_padding():
    """forces: gradient (forces and stress by autograd through the padded batch): the dummy structure's
    strain and positions reach none of the real outputs."""
    plain, padded = _pair(ExecutionPlan(pad_atoms_multiple=16, pad_edges_multiple=64), forces="gradient")
    batch = batch_from_atoms(slab_structures(5, 2), torch.float64)
    ref, ref_grads, _ = _run(plain, batch)
    out, grads, _ = _run(padded, GraphBuilder.for_model(plain.cfg)(batch))
    assert set(out) == {"energy", "forces", "stress"}
    _assert_same(out, ref, grads, ref_grads, rtol=1e-9, atol=1e-11)


def test_plan_without_buckets_removes_the_hooks():
    model = apply_plan(EquiformerV2(ModelConfig(**SMALL)), ExecutionPlan(pad_atoms_multiple=16))
    assert model._forward_pre_hooks and model._forward_hooks
    keys = set(model.state_dict())
    copied = apply_plan(copy.deepcopy(model), REFERENCE)  # a copy's hooks are its own
    assert not copied._forward_pre_hooks and model._forward_pre_hooks and model._forward_hooks
    apply_plan(model, REFERENCE)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert set(model.state_dict()) == keys == set(EquiformerV2(ModelConfig(**SMALL)).state_dict())


def test_negative_padding_multiple_is_rejected():
    with pytest.raises(ValueError, match="execution.pad_edges_multiple must be >= 0"):
        choose_plan(device_type="cpu", dtype="fp32", lmax=3, mmax=2,
                    overrides=ExecutionOverrides(pad_edges_multiple=-1))
    with pytest.raises(ValueError, match="execution.pad_edges_multiple must be >= 0"):
        apply_plan(EquiformerV2(ModelConfig(**SMALL)), ExecutionPlan(pad_edges_multiple=-1))
