"""eqv2/training/garbage.py: Python's garbage collections timed per interval, and the manual schedule."""
import gc
import weakref

import pytest

from eqv2.config import ConfigError, from_dict
from eqv2.training.garbage import GarbageCollection, GCConfig
from tests.train.conftest import HERE, data_args, records, run_train


def _cycles(n: int = 20000) -> None:
    for _ in range(n):
        a: list = []
        a.append(a)  # garbage only a collection frees


def test_collections_are_timed_and_counted():
    assert gc.isenabled()
    collector = GarbageCollection(GCConfig())
    collector.start()
    try:
        assert gc.isenabled()  # automatic collection stays on by default
        _cycles()
        gc.collect()
        full, seconds = collector.take()
        assert full >= 1 and seconds > 0
        gc.collect(0)  # a young-generation collection is timed, not counted as full
        full, seconds = collector.take()
        assert full == 0 and seconds > 0
        assert collector.take() == (0, 0.0)  # take() resets
    finally:
        collector.stop()
    assert collector._callback not in gc.callbacks and gc.isenabled()
    gc.collect()
    assert collector.take() == (0, 0.0)  # stopped: no longer timed


class _Node:
    pass


def _cycle() -> weakref.ref:
    node = _Node()
    node.self = node  # only a collection frees it
    return weakref.ref(node)


def test_freeze_after_the_first_step_and_after_graphs_are_built():
    assert gc.get_freeze_count() == 0
    collector = GarbageCollection(GCConfig())
    keep = [[i] for i in range(50000)]  # long-lived objects, like a model's and its compiled graphs'
    collector.start()
    try:
        dead = _cycle()
        collector.after_step(1, graph_events=0)  # the first step: collect, then freeze the survivors
        assert dead() is None  # garbage is collected before the freeze, not frozen with the rest
        first = gc.get_freeze_count()
        assert first >= len(keep) and collector.take()[0] == 1
        more = [[i] for i in range(20000)]
        collector.after_step(2, graph_events=0)  # nothing compiled: no collection, nothing frozen
        assert gc.get_freeze_count() == first and collector.take()[0] == 0
        collector.after_step(3, graph_events=7)  # a compilation or recording: freeze what is new
        assert gc.get_freeze_count() >= first + len(more) and collector.take()[0] == 1
        gc.collect()  # a full collection now walks only what came after the freeze
        assert collector.take()[0] == 1
    finally:
        collector.stop()
    assert gc.get_freeze_count() == 0  # stop() puts the objects back into the collected generations


def test_no_freeze_when_switched_off():
    collector = GarbageCollection(GCConfig(freeze=False))
    collector.start()
    try:
        collector.after_step(1, graph_events=0)
        collector.after_step(2, graph_events=3)
        assert gc.get_freeze_count() == 0 and collector.take() == (0, 0.0)
    finally:
        collector.stop()


def test_manual_mode_collects_on_schedule_only():
    collector = GarbageCollection(GCConfig(manual_every_steps=3, freeze=False))
    collector.start()
    try:
        assert not gc.isenabled()  # no collection at a moment Python picks
        _cycles(50000)  # far past the automatic threshold: nothing runs
        assert collector.take()[0] == 0
        collector.after_step(2)
        assert collector.take() == (0, 0.0)
        collector.after_step(3)
        assert collector.take()[0] == 1
    finally:
        collector.stop()
    assert gc.isenabled()


def test_gc_config_is_checked():
    assert from_dict(GCConfig, {"manual_every_steps": 100}).manual_every_steps == 100
    with pytest.raises(ValueError, match="gc.manual_every_steps"):
        GCConfig(manual_every_steps=-1)
    with pytest.raises(ConfigError, match="manual_every"):
        from_dict(GCConfig, {"manual_every": 100})


def test_the_trainer_logs_collections_and_collects_on_schedule(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    rc, out = run_train(["--ds_config", str(HERE / "ds_zero2_cpu.json"), "--config", str(HERE / "tiny_run.yaml"),
                         *data_args(demo_data), "--set", f"run_dir={run_dir}", "--set", "optim.max_steps=8",
                         "--set", "checkpoint.every_steps=1000", "--set", "gc.manual_every_steps=3"], timeout=600)
    assert rc == [0], out[-3000:]
    train, _ = records(run_dir)  # logged every step
    full = {step: rec["gc_full"] for step, rec in train.items()}
    # automatic collection off: exactly the scheduled full collections, logged in their step's interval
    # and the collection before the freeze after step 1
    assert full == {s: int(s % 3 == 0 or s == 1) for s in range(1, 9)}, full
    assert all(train[s]["gc_s"] > 0 for s in (3, 6))
