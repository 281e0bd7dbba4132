"""Radius graphs built in the DataLoader worker processes (the trainer's `data.build_graphs`): every
batch carries the graph the model would have built, and a structure that cannot be a graph stops the
stream with an error naming its sample, through the worker processes."""
from __future__ import annotations

import numpy as np
import pytest

from eqv2.data import DataConfig, TrainStream, val_batches
from eqv2.data.format import sample_key
from eqv2.model.graph import GraphBuilder, GraphInputError, radius_graph_pbc

from .conftest import oc20_frames, with_energy, write_uneven

BUILDER = GraphBuilder(6.0, 20, 90)


def _cfg(d, **kw) -> DataConfig:
    return DataConfig(train_manifest=str(d / "manifest.json"), val_manifest=str(d / "manifest.json"),
                      batch_size=3, shuffle_buffer=10, num_workers=2, **kw)


def _assert_graph_of(batch) -> None:
    graph = radius_graph_pbc(batch.pos, batch.cell, batch.pbc, batch.natoms, 6.0, 20)
    assert batch.graph_spec == (6.0, 20, 90, True)
    assert batch.edge_index is not None and batch.cell_offset is not None
    assert np.array_equal(batch.edge_index.numpy(), graph.edge_index.numpy())
    assert np.array_equal(batch.cell_offset.numpy(), graph.cell_offset.numpy())


def test_train_and_val_batches_carry_the_models_graph(uneven_dir):
    train = list(TrainStream(_cfg(uneven_dir), 0, 2, BUILDER).epoch_batches(0))
    val = list(val_batches(_cfg(uneven_dir), 1, 2, BUILDER))
    assert train and val
    for batch in train + val:
        _assert_graph_of(batch)
    plain = next(iter(TrainStream(_cfg(uneven_dir), 0, 2).epoch_batches(0)))
    assert plain.edge_index is None and plain.graph_spec is None  # no builder: the model builds it


def test_exact_resume_is_unchanged_by_graph_building(uneven_dir):
    stream = TrainStream(_cfg(uneven_dir), 0, 1, BUILDER)
    first = [b.ids for b in stream.epoch_batches(0)]
    again = TrainStream(_cfg(uneven_dir), 0, 1)
    assert [b.ids for b in again.epoch_batches(0)] == first


@pytest.mark.parametrize("workers", [0, 2])
def test_structure_that_cannot_be_a_graph_names_its_sample(tmp_path, workers):
    samples = with_energy(oc20_frames(12, seed=3))
    samples[7]["positions"][4] = samples[7]["positions"][2]  # two atoms at one place
    bad = sample_key(samples[7]["sid"], samples[7]["fid"])
    write_uneven(tmp_path, samples, [6, 6])
    cfg = DataConfig(train_manifest=str(tmp_path / "manifest.json"), batch_size=2, num_workers=workers)
    with pytest.raises(GraphInputError, match=f"id {bad}\\): atoms (2 and 4|4 and 2) .*coincide"):
        list(TrainStream(cfg, 0, 1, BUILDER).epoch_batches(0))


@pytest.mark.parametrize("workers", [0, 2])
def test_on_error_skip_drops_a_structure_that_cannot_be_a_graph(tmp_path, workers, caplog):
    import logging

    samples = with_energy(oc20_frames(12, seed=3))
    samples[7]["positions"][4] = samples[7]["positions"][2]
    bad = sample_key(samples[7]["sid"], samples[7]["fid"])
    write_uneven(tmp_path, samples, [6, 6])
    cfg = DataConfig(train_manifest=str(tmp_path / "manifest.json"), batch_size=2, num_workers=workers,
                     on_error="skip")
    stream = TrainStream(cfg, 0, 1, BUILDER)
    with caplog.at_level(logging.INFO, logger="eqv2.data"):
        batches = list(stream.epoch_batches(0))
    ids = [i for b in batches for i in b.ids]
    assert len(batches) == stream.steps_in_epoch(0)  # the plan's step count is kept: one batch is smaller
    assert len(ids) == 11 and bad not in ids and stream.skipped == 1
    assert any(bad in r.getMessage() and "coincide" in r.getMessage() for r in caplog.records)
    for batch in batches:
        _assert_graph_of(batch)


def test_on_error_skip_refuses_a_batch_with_no_good_structure(tmp_path):
    samples = with_energy(oc20_frames(4, seed=3))
    for s in samples:
        s["positions"][1] = s["positions"][0]
    write_uneven(tmp_path, samples, [4])
    cfg = DataConfig(train_manifest=str(tmp_path / "manifest.json"), batch_size=2, num_workers=0, on_error="skip")
    from eqv2.data import SampleError
    with pytest.raises(SampleError, match="every sample of a batch was rejected .*coincide"):
        list(TrainStream(cfg, 0, 1, BUILDER).epoch_batches(0))


def test_batches_padded_in_the_workers_give_the_unpadded_step(tmp_path, monkeypatch):
    """Shape buckets under data.build_graphs: the loader workers (separate processes) pad each batch; the
    main process receives it with its bucket of the plan's shape, pads nothing, and one step (loss and
    gradients) on it under the plan with buckets is the step of the unpadded batch under the reference plan."""
    import torch

    import eqv2.buckets
    from eqv2.buckets import fits, loader_prepare
    from eqv2.execution import REFERENCE, ExecutionPlan, apply_plan
    from eqv2.model.config import ModelConfig
    from eqv2.model.equiformer_v2 import EquiformerV2
    from eqv2.training.compile import ShapeBuckets
    from eqv2.training.loss import EnergyForceLoss, LossConfig, Normalizers, global_counts

    write_uneven(tmp_path, with_energy(oc20_frames(8, seed=5)), [4, 4])
    cfg = DataConfig(train_manifest=str(tmp_path / "manifest.json"), batch_size=3, num_workers=2)
    model_cfg = ModelConfig(num_layers=1, lmax=2, mmax=1, sphere_channels=8, attn_hidden_channels=8,
                            attn_alpha_channels=4, attn_value_channels=2, ffn_hidden_channels=8, edge_channels=8,
                            num_heads=2, alpha_drop=0.0, drop_path_rate=0.0, max_radius=6.0, max_neighbors=20)
    plan = ExecutionPlan(pad_atoms_multiple=64, pad_edges_multiple=1024)
    graphs = GraphBuilder.for_model(model_cfg)
    padded = list(TrainStream(cfg, 0, 1, loader_prepare(graphs, plan)).epoch_batches(0))
    plain = list(TrainStream(cfg, 0, 1, graphs).epoch_batches(0))
    assert len(padded) == len(plain) == 4
    buckets = ShapeBuckets(64, 1024)
    for batch, ref in zip(padded, plain):
        bucket = batch.bucket
        assert bucket is not None and fits(batch, 64, 1024) and batch._views_of(bucket)  # views survived pickling
        assert bucket.pos.shape[0] % 64 == 0 and bucket.edge_index.shape[1] % 1024 == 0
        assert buckets.shape(batch) == (bucket.pos.shape[0], bucket.num_graphs, bucket.edge_index.shape[1])
        assert batch.ids == ref.ids and torch.equal(batch.pos, ref.pos) and torch.equal(batch.edge_index, ref.edge_index)
        assert batch.pos.shape == batch.forces.shape and batch.energy.shape == batch.natoms.shape  # targets: real only

    torch.manual_seed(0)
    reference = apply_plan(EquiformerV2(model_cfg), REFERENCE).train()
    bucketed = apply_plan(EquiformerV2(model_cfg), plan).train()
    bucketed.load_state_dict(reference.state_dict())
    loss_fn = EnergyForceLoss(LossConfig(), Normalizers(-0.7, 2.9, 2.9))
    monkeypatch.setattr(eqv2.buckets, "pad_to_bucket", lambda *a: pytest.fail("padding in the main process"))

    def step(model, batches):
        model.zero_grad(set_to_none=True)
        counts = global_counts(batches, False, torch.device("cpu"))
        total = sum(loss_fn(model(b), b, counts, 1.0)[0] for b in batches)
        total.backward()
        return total.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step(bucketed, padded)
    ref_loss, ref_grads = step(reference, plain)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
