"""Python's garbage collector in the training loop: measured always, scheduled on request.

A collection of the oldest generation walks every tracked Python object of the process.  After
torch.compile has built its graphs and CUDA-graph trees that heap is large, and a full collection can
stall the loop for a noticeable time at a moment Python chooses.  On one rank that is a slower step; on
N ranks it is worse, because each rank collects at its own moment and the others wait for it at the
next gradient all-reduce.  Synchronous training loops at scale therefore commonly switch automatic
collection off and collect on every rank at the same step.

`gc.freeze` (default true) makes full collections cheap in the first place: after the first optimizer
step, and after every later step in which torch compiled a graph or recorded a CUDA graph, the trainer
runs one full collection and then `gc.freeze()`s the survivors: the model, the optimizer, DeepSpeed's
engine and the compiled graphs move to Python's permanent generation, which no later collection walks.
Each freeze costs one collection of what is new since the last one; later objects (per-step tensors'
Python wrappers and their cycles) are collected as usual.  On an H200, 153M compiled, a full collection
took about 1 s without it (docs/perf-notes.md, session 12).  `stop()` unfreezes.

`gc.manual_every_steps: N` schedules collections instead: automatic collection is off while the loop
runs and every rank runs a full collection after each N-th optimizer step (the data loader's worker
processes, forked from the trainer, turn automatic collection back on for themselves).  0 (the
default) leaves Python's automatic collection on.  Without the freeze, on two H200s at N = 50, each
scheduled collection still took 0.5-0.85 s, more than the automatic ones cost (session 12).  Either way the trainer logs, per interval and summed over ranks, how many full
collections ran and how long all collections took (`gc_full`, `gc_s` in metrics.jsonl).
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass


@dataclass
class GCConfig:
    # 0: Python's automatic collection; N > 0: automatic collection off during training and a full
    # collection on every rank after every N-th optimizer step (the same steps on all ranks)
    manual_every_steps: int = 0
    # after step 1 and after every step that compiled or recorded graphs: collect, then gc.freeze() the
    # survivors so that later full collections skip them; false: no freezing
    freeze: bool = True

    def __post_init__(self) -> None:
        if self.manual_every_steps < 0:
            raise ValueError(f"gc.manual_every_steps must be >= 0, got {self.manual_every_steps}")


class GarbageCollection:
    """Times every collection (through `gc.callbacks`) and, in manual mode, runs them on schedule.
    `start()` before the training loop, `stop()` after it (also on error): the callback is removed and
    automatic collection is restored as it was."""

    def __init__(self, cfg: GCConfig) -> None:
        self.every = cfg.manual_every_steps
        self.freeze = cfg.freeze
        self._graph_events = -1  # compile events seen at the last freeze (-1: nothing frozen yet)
        self.seconds, self.full = 0.0, 0
        self._t0: float | None = None
        self._was_enabled = True

    def start(self) -> None:
        self._was_enabled = gc.isenabled()
        gc.callbacks.append(self._callback)
        if self.every:
            gc.disable()

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
        if self._graph_events >= 0:
            gc.unfreeze()
        if self._was_enabled:
            gc.enable()

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None
            self.full += info.get("generation") == 2

    def after_step(self, step: int, graph_events: int = 0) -> None:
        """Call after optimizer step `step` (1-based) on every rank; `graph_events`: the process's running
        count of compilations and CUDA-graph recordings (0 for an eager model)."""
        if self.freeze and graph_events != self._graph_events:  # step 1, or graphs were built
            gc.collect()
            gc.freeze()
            self._graph_events = graph_events
        elif self.every and step % self.every == 0:
            gc.collect()

    def take(self) -> tuple[int, float]:
        """(full collections, seconds in all collections) since the last call; resets them."""
        out = (self.full, self.seconds)
        self.full, self.seconds = 0, 0.0
        return out
