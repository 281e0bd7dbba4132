"""The training forward and backward pass never waits on the device (issue 6: no host syncs in the step).

Run on PyTorch's `meta` device, where tensors have shapes but no data: any host read of a value
(`.item()`, `bool(t)`, `int(t)`, `.tolist()`, data-dependent shapes such as `nonzero`) raises, so a pass
that completes makes none.  A dispatch mode also records every operation that moves data between
devices (a constant table copied from the host each step is, on a GPU, a synchronous copy that waits
for all queued work).  Graphs come from the loader (GraphBuilder), as in training, with shape buckets (built
with the batch as the loader workers do, or by the plan's hooks), dropout and stochastic depth on.  The GPU counterpart runs under torch.cuda.set_sync_debug_mode.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from eqv2.buckets import pad_to_bucket
from eqv2.execution import ExecutionPlan, apply_plan
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from eqv2.model.graph import GraphBuilder
from tests.model.equivariance import batch_from_atoms
from tests.model.fairchem_reference import slab_structures


class CrossDeviceOps(TorchDispatchMode):
    """Records operations whose tensor arguments and results are not all on one device."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in [*args, *(out if isinstance(out, (tuple, list)) else [out])] if isinstance(t, torch.Tensor)]
        if len({t.device.type for t in tensors}) > 1:
            self.seen.append(f"{func} {[t.device.type for t in tensors]}")
        return out


def _spy_host_data(monkeypatch) -> list[str]:
    """Record tensors made on the device from host data (new_tensor, torch.tensor, torch.as_tensor): on
    a GPU each is a synchronous host-to-device copy.  They bypass dispatch modes, hence these spies."""
    made: list[str] = []

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.device.type == "meta":
                made.append(name)
            return out
        return wrapper
    monkeypatch.setattr(torch.Tensor, "new_tensor", spy("Tensor.new_tensor", torch.Tensor.new_tensor))
    monkeypatch.setattr(torch, "tensor", spy("torch.tensor", torch.tensor))
    monkeypatch.setattr(torch, "as_tensor", spy("torch.as_tensor", torch.as_tensor))
    return made


@pytest.mark.parametrize("kernels, ahead", [(dict(), False), (dict(), True),
                                             (dict(so2_fused_input_grad=True, rotation_align=8), True)])
def test_training_step_reads_nothing_back_and_copies_nothing_to_the_device(kernels, ahead, monkeypatch):
    """ahead: the batch's shape bucket built with it (as the loader workers do), else by the plan's hooks."""
    cfg = ModelConfig(num_layers=2, lmax=4, mmax=2, sphere_channels=16, attn_hidden_channels=8, attn_alpha_channels=8,
                      attn_value_channels=4, ffn_hidden_channels=16, edge_channels=16, num_heads=2, max_radius=6.0,
                      alpha_drop=0.1, drop_path_rate=0.1, proj_drop=0.1)
    plan = ExecutionPlan(pad_atoms_multiple=16, pad_edges_multiple=64, **kernels)
    from dataclasses import replace

    from eqv2.training.loss import EnergyForceLoss, LossConfig, Normalizers, global_counts

    model = apply_plan(EquiformerV2(cfg), plan).train().to("meta")
    batch = GraphBuilder(6.0, cfg.max_neighbors, cfg.max_num_elements)(
        batch_from_atoms(slab_structures(0, 2), torch.float32))
    n = batch.pos.shape[0]
    batch = replace(batch, energy=torch.zeros(2), forces=torch.zeros(n, 3), fixed=torch.arange(n) % 3 == 0)
    if ahead:
        batch = pad_to_bucket(batch, plan.pad_atoms_multiple, plan.pad_edges_multiple)
    batch = batch.to("meta")
    assert (batch.bucket is not None) == ahead
    loss_fn = EnergyForceLoss(LossConfig(), Normalizers(-0.7, 2.9, 2.9))
    mode, made = CrossDeviceOps(), _spy_host_data(monkeypatch)
    with mode:  # the trainer's micro-batch: step counts, forward, loss, backward
        counts = global_counts([batch, batch], True, batch.pos.device)
        out = model(batch)
        loss, _ = loss_fn(out, batch, counts, 2.0)
        loss.backward()
    assert out["forces"].shape == batch.pos.shape
    assert not mode.seen, mode.seen
    assert not made, made
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_model_building_its_own_graph_is_refused_on_the_meta_device():
    """The check is real: the model's own neighbour search has data-dependent shapes and host reads."""
    model = EquiformerV2(ModelConfig(num_layers=1, lmax=2, mmax=1, sphere_channels=8, attn_hidden_channels=8,
                                     attn_alpha_channels=4, attn_value_channels=2, ffn_hidden_channels=8,
                                     edge_channels=8, num_heads=2, max_radius=6.0)).to("meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        model(batch_from_atoms(slab_structures(0, 1), torch.float32).to("meta"))
