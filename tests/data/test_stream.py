"""Distribution guarantees of TrainStream / val_batches with real DataLoader worker processes.

Ranks are simulated by building the stream of each rank in turn (a rank's stream never talks to
other ranks); workers are real processes.  Shards are deliberately uneven (1..14 samples).
"""
from __future__ import annotations

import gc
from collections import Counter

import pytest

from eqv2.config import ConfigError, from_dict
from eqv2.data import DataConfig, PlanError, TrainStream, num_val_batches, val_batches


def _cfg(d, **kw) -> DataConfig:
    base = dict(train_manifest=str(d / "manifest.json"), val_manifest=str(d / "manifest.json"),
                shuffle_buffer=10, num_workers=2)
    base.update(kw)
    if "max_atoms" not in base:
        base.setdefault("batch_size", 3)
    return DataConfig(**base)


def _epoch(cfg, world, epoch):
    per_rank = []
    for rank in range(world):
        s = TrainStream(cfg, rank, world)
        batches = list(s.epoch_batches(epoch))
        assert len(batches) == s.steps_in_epoch(epoch)
        per_rank.append(batches)
    return per_rank


@pytest.mark.parametrize("world,workers,mode", [
    (1, 0, {"batch_size": 4}),
    (2, 2, {"batch_size": 3}),
    (3, 1, {"max_atoms": 90}),
    (2, 2, {"max_atoms": 120}),
])
def test_exactly_once_equal_steps_uneven_shards(uneven_dir, world, workers, mode):
    cfg = _cfg(uneven_dir, num_workers=workers, **mode)
    orders = []
    for epoch in (0, 1):
        per_rank = _epoch(cfg, world, epoch)
        assert len({len(b) for b in per_rank}) == 1, "every rank must take the same number of steps"
        ids = [i for batches in per_rank for b in batches for i in b.ids]
        assert len(ids) == 60 and len(set(ids)) == 60, Counter(ids).most_common(3)
        for batches in per_rank:
            for b in batches:
                assert b.num_graphs >= 1
                if "batch_size" in mode:
                    assert b.num_graphs <= mode["batch_size"]
                else:
                    assert int(b.natoms.sum()) <= mode["max_atoms"]
        orders.append(ids)
    assert orders[0] != orders[1], "shard order and shuffle must change with the epoch"


def test_same_seed_same_order_different_seed_differs(uneven_dir):
    a = [b.ids for b in TrainStream(_cfg(uneven_dir, num_workers=0), 0, 1).epoch_batches(0)]
    b = [b.ids for b in TrainStream(_cfg(uneven_dir, num_workers=0), 0, 1).epoch_batches(0)]
    c = [b.ids for b in TrainStream(_cfg(uneven_dir, num_workers=0, seed=1), 0, 1).epoch_batches(0)]
    assert a == b and a != c


@pytest.mark.parametrize("world,workers,stop", [(2, 2, 5), (1, 3, 4), (2, 0, 7)])
def test_exact_resume(uneven_dir, world, workers, stop):
    cfg = _cfg(uneven_dir, num_workers=workers, batch_size=2 if world == 1 else 4)
    full = TrainStream(cfg, world - 1, world)
    reference = [b.ids for e in (0, 1) for b in full.epoch_batches(e)]
    first = TrainStream(cfg, world - 1, world)
    got = []
    for i, b in enumerate(first.epoch_batches(0)):
        got.append(b.ids)
        if i + 1 == stop:
            break
    state = first.state_dict()
    assert state["epoch"] == 0 and state["step"] == stop
    resumed = TrainStream(cfg, world - 1, world)
    resumed.load_state_dict(state)
    got += [b.ids for b in resumed.epoch_batches(0)]
    assert resumed.state_dict()["epoch"] == 1
    got += [b.ids for b in resumed.epoch_batches(1)]
    assert got == reference


def test_resume_with_max_atoms_mid_group(uneven_dir):
    cfg = _cfg(uneven_dir, num_workers=2, max_atoms=80, shuffle_buffer=25)
    reference = [b.ids for b in TrainStream(cfg, 0, 1).epoch_batches(0)]
    for stop in (1, len(reference) // 2, len(reference) - 1):
        s = TrainStream(cfg, 0, 1)
        it = s.epoch_batches(0)
        got = [next(it).ids for _ in range(stop)]
        it.close()
        r = TrainStream(cfg, 0, 1)
        r.load_state_dict(s.state_dict())
        assert got + [b.ids for b in r.epoch_batches(0)] == reference


def test_resume_refuses_changed_setup(uneven_dir):
    state = TrainStream(_cfg(uneven_dir), 0, 2).state_dict()
    with pytest.raises(ValueError, match="world_size was 2 in the checkpoint, now 1"):
        TrainStream(_cfg(uneven_dir), 0, 1).load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers"):
        TrainStream(_cfg(uneven_dir, num_workers=1), 0, 2).load_state_dict(state)


@pytest.mark.parametrize("world,workers,mode", [(3, 1, {"batch_size": 4}), (2, 2, {"max_atoms": 100}), (1, 0, {"batch_size": 7})])
def test_validation_exactly_once_equal_counts(uneven_dir, world, workers, mode):
    cfg = _cfg(uneven_dir, num_workers=workers, **mode)
    per_rank = [list(val_batches(cfg, r, world)) for r in range(world)]
    assert {len(b) for b in per_rank} == {num_val_batches(cfg, world)}
    ids = [i for batches in per_rank for b in batches for i in b.ids]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 60
    again = [i for r in range(world) for b in val_batches(cfg, r, world) for i in b.ids]
    assert again == ids  # fixed order


def test_plan_errors_are_explicit(uneven_dir):
    with pytest.raises(PlanError, match="10 shards cannot feed 12 reader slots"):
        TrainStream(_cfg(uneven_dir, num_workers=3), 0, 4)
    with pytest.raises(PlanError, match="smaller than the largest structure"):
        TrainStream(_cfg(uneven_dir, max_atoms=20), 0, 1)


def test_config_from_yaml_mapping(uneven_dir):
    cfg = from_dict(DataConfig, {"train_manifest": "m.json", "max_atoms": 500, "on_error": "skip"}, "data")
    assert cfg.max_atoms == 500 and cfg.on_error == "skip"
    with pytest.raises(ConfigError, match="unknown config key data.batchsize"):
        from_dict(DataConfig, {"train_manifest": "m.json", "batchsize": 4}, "data")
    with pytest.raises(ConfigError, match="exactly one of data.batch_size"):
        from_dict(DataConfig, {"train_manifest": "m.json", "batch_size": 4, "max_atoms": 100}, "data")
    with pytest.raises(ConfigError, match="on_error"):
        from_dict(DataConfig, {"train_manifest": "m.json", "batch_size": 4, "on_error": "ignore"}, "data")


def _needs_automatic_gc(batch):
    if not gc.isenabled():
        raise RuntimeError("a loader worker runs with automatic garbage collection off")
    return batch


def test_workers_collect_garbage_when_the_trainer_does_not(uneven_dir):
    """gc.manual_every_steps turns automatic collection off in the trainer; forked workers inherit that
    and, living for a whole epoch, would never collect their cyclic garbage."""
    stream = TrainStream(_cfg(uneven_dir, num_workers=2), 0, 1, prepare=_needs_automatic_gc)
    gc.disable()
    try:
        assert sum(1 for _ in stream.epoch_batches(0)) == stream.steps_in_epoch(0)
    finally:
        gc.enable()


def _one_thread(batch):
    import torch

    if torch.get_num_threads() != 1:
        raise RuntimeError(f"a loader worker runs {torch.get_num_threads()} intra-op threads")
    return batch


def test_threads_limited_in_workers_only(uneven_dir):
    """Loader workers run one intra-op thread each; with num_workers 0 the batches are read in the
    trainer process, whose thread count must stay as it was (it was set to 1: training on one core)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stream = TrainStream(_cfg(uneven_dir, num_workers=2), 0, 1, prepare=_one_thread)
        assert sum(1 for _ in stream.epoch_batches(0)) == stream.steps_in_epoch(0)
        inline = TrainStream(_cfg(uneven_dir, num_workers=0), 0, 1)
        assert sum(1 for _ in inline.epoch_batches(0)) == inline.steps_in_epoch(0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
