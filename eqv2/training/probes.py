"""Diagnostics that watch the training loop from outside it.

Each diagnostic (the step profiler, Python's garbage-collection control, the shape-bucket counter) is a
`Probe`; the trainer registers them once and its loop calls `Probes.before_step` / `Probes.after_step`
around each optimizer step, so the loop itself names no diagnostic.  A probe must not change what the
step computes: it may time, count or collect garbage, never touch the weights, the data or the seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from eqv2.batch import AtomsBatch
from eqv2.training.compile import CompileEvents, ShapeBuckets
from eqv2.training.garbage import GarbageCollection
from eqv2.training.profiling import StepProfiler


class Probe(Protocol):
    def on_start(self) -> None:
        """Once, just before the first step of this launch."""

    def before_step(self, step: int, micro: list[AtomsBatch]) -> None:
        """Before step number `step` (1-based) runs on `micro`, this rank's host micro-batches."""

    def after_step(self, step: int) -> None:
        """After step number `step` has run (weights updated)."""

    def on_end(self) -> None:
        """Once, when the loop ends for any reason (finished, stopped, or an exception)."""


class ProfilerProbe:
    """log.profile_steps: torch's profiler around the chosen steps (eqv2/training/profiling.py)."""

    def __init__(self, profiler: StepProfiler) -> None:
        self.profiler = profiler

    def on_start(self) -> None:
        pass

    def before_step(self, step: int, micro: list[AtomsBatch]) -> None:
        self.profiler.before(step)

    def after_step(self, step: int) -> None:
        self.profiler.after(step)

    def on_end(self) -> None:
        self.profiler.close()


class GarbageProbe:
    """gc: Python's collector run between steps, not inside them (eqv2/training/garbage.py); the compile
    events seen so far tell it when compiled graphs were recorded (then it collects once more)."""

    def __init__(self, collector: GarbageCollection, compile_events: CompileEvents | None) -> None:
        self.collector, self.compile_events = collector, compile_events

    def on_start(self) -> None:
        self.collector.start()

    def before_step(self, step: int, micro: list[AtomsBatch]) -> None:
        pass

    def after_step(self, step: int) -> None:
        self.collector.after_step(step, self.compile_events.total if self.compile_events is not None else 0)

    def on_end(self) -> None:
        self.collector.stop()


class ShapeBucketProbe:
    """Padded models: counts the padded shapes not met before (each a CUDA-graph recording), which the
    step logger reports per interval as new_shape_buckets."""

    def __init__(self, buckets: ShapeBuckets, logger) -> None:
        self.buckets, self.logger = buckets, logger  # logger: eqv2.training.monitor.StepLogger

    def on_start(self) -> None:
        pass

    def before_step(self, step: int, micro: list[AtomsBatch]) -> None:
        self.logger.new_shape_buckets += self.buckets.count_new(micro)

    def after_step(self, step: int) -> None:
        pass

    def on_end(self) -> None:
        pass


class Probes:
    """The probes of one run, called in registration order."""

    def __init__(self, probes: list[Probe]) -> None:
        self.probes = probes

    @classmethod
    def for_run(cls, profile_steps: list[int] | None, run_dir: Path, rank: int, device, logger,
                collector: GarbageCollection, compile_events: CompileEvents | None,
                buckets: ShapeBuckets | None, model=None, compiled: list[str] | tuple = ()) -> Probes:
        """model, compiled: the module ranges of the profile's categories (training/profiling.py)."""
        probes: list[Probe] = [GarbageProbe(collector, compile_events),
                               ProfilerProbe(StepProfiler(profile_steps, run_dir, rank, device, model, compiled))]
        if buckets is not None:
            probes.append(ShapeBucketProbe(buckets, logger))
        return cls(probes)

    def on_start(self) -> None:
        for probe in self.probes:
            probe.on_start()

    def before_step(self, step: int, micro: list[AtomsBatch]) -> None:
        for probe in self.probes:
            probe.before_step(step, micro)

    def after_step(self, step: int) -> None:
        for probe in self.probes:
            probe.after_step(step)

    def on_end(self) -> None:
        for probe in self.probes:
            probe.on_end()
