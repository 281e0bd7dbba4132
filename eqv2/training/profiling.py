"""Profile a few training steps with the torch profiler: where a step's time goes, on the host and the GPU.

`log.profile_steps: [first, last]` (1-based step numbers, as logged) records those steps on every rank
and writes `profile_rank<r>.txt` into the run directory: the operator and kernel table sorted by device
time (GPU) or host time (CPU), plus the wall-clock seconds per profiled step, which the table's totals
can be compared with (GPU time well below wall time means the step waits on the host).  Profiling
slows the profiled steps; the throughput logged for their interval is not representative.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from eqv2.config import ConfigError


def check_profile_steps(steps: list[int] | None) -> None:
    if steps is None:
        return
    if len(steps) != 2 or not all(isinstance(s, int) for s in steps) or not 1 <= steps[0] <= steps[1]:
        raise ConfigError(f"log.profile_steps must be [first, last] with 1 <= first <= last, got {steps}")


class StepProfiler:
    """Start before step `first`, stop after step `last`; a no-op when `steps` is None."""

    def __init__(self, steps: list[int] | None, run_dir: Path, rank: int, device: torch.device):
        self.first, self.last = steps if steps else (0, -1)
        self.path = Path(run_dir) / f"profile_rank{rank}.txt"
        self.device = device
        self.prof = None
        self.t0 = 0.0

    def before(self, step: int) -> None:
        """Call before running step number `step` (1-based)."""
        if step != self.first:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.prof = profile(activities=activities)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def after(self, step: int) -> None:
        """Call after step number `step` has run; writes the table after the last profiled step."""
        if self.prof is None or step != self.last:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        n = self.last - self.first + 1
        sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self.prof.key_averages().table(sort_by=sort, row_limit=80)
        self.path.write_text(f"steps {self.first}-{self.last}: {wall / n * 1e3:.1f} ms wall per step "
                             f"(profiler overhead included)\n{table}\n")
        self.prof = None

    def close(self) -> None:
        """Stop a profile the run ended inside of (stop signal, error) without writing it."""
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.prof = None

