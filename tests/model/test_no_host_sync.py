"""The training forward and backward pass never waits on the device (issue 6: no host syncs in the step).

Run on PyTorch's `meta` device, where tensors have shapes but no data: any host read of a value
(`.item()`, `bool(t)`, `int(t)`, `.tolist()`, data-dependent shapes such as `nonzero`) raises, so a pass
that completes makes none.  A dispatch mode also records every operation that moves data between
devices (a constant table copied from the host each step is, on a GPU, a synchronous copy that waits
for all queued work).  Graphs come from the loader (GraphBuilder), as in training, with shape buckets,
dropout and stochastic depth on.  The GPU counterpart runs under torch.cuda.set_sync_debug_mode.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


@pytest.mark.parametrize("kernels", [dict(), dict(so2_fused_input_grad=True, rotation_align=8)])
def test_training_pass_reads_nothing_back_and_copies_nothing_to_the_device(kernels):
    cfg = ModelConfig(num_layers=2, lmax=4, mmax=2, sphere_channels=16, attn_hidden_channels=8, attn_alpha_channels=8,
                      attn_value_channels=4, ffn_hidden_channels=16, edge_channels=16, num_heads=2, max_radius=6.0,
                      alpha_drop=0.1, drop_path_rate=0.1, proj_drop=0.1, pad_atoms_multiple=16,
                      pad_edges_multiple=64, **kernels)
    model = EquiformerV2(cfg).train().to("meta")
    batch = GraphBuilder(6.0, cfg.max_neighbors, cfg.max_num_elements)(
        batch_from_atoms(slab_structures(0, 2), torch.float32)).to("meta")
    mode = CrossDeviceOps()
    with mode:
        out = model(batch)
        (out["energy"].sum() + out["forces"].square().sum()).backward()
    assert out["forces"].shape == batch.pos.shape
    assert not mode.seen, mode.seen
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_model_building_its_own_graph_is_refused_on_the_meta_device():
    """The check is real: the model's own neighbour search has data-dependent shapes and host reads."""
    model = EquiformerV2(ModelConfig(num_layers=1, lmax=2, mmax=1, sphere_channels=8, attn_hidden_channels=8,
                                     attn_alpha_channels=4, attn_value_channels=2, ffn_hidden_channels=8,
                                     edge_channels=8, num_heads=2, max_radius=6.0)).to("meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        model(batch_from_atoms(slab_structures(0, 1), torch.float32).to("meta"))
