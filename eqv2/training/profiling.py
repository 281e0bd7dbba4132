"""Profile a few training steps with the torch profiler: where a step's time goes, on the host and the GPU.

`log.profile_steps: [first, last]` (1-based step numbers, as logged) records those steps on every rank
and writes `profile_rank<r>.txt` into the run directory: the operator and kernel table sorted by device
time (GPU) or host time (CPU), plus the wall-clock seconds per profiled step and, on a GPU, the time
some kernel was running (the union of kernel intervals) and the idle gaps between: GPU busy well below
wall time means the step waits on the host; a second table then shows where the host time goes.  Beside it,
`profile_rank<r>.json` holds the same steps by category (rotations, SO(2) convolutions, S² activation,
attention, norms, optimizer step, EMA, clipping, communication, ...: training/profile_breakdown.py) and the
host synchronisations per step.  Profiling slows the profiled steps; the throughput logged for their
interval is not representative.

The trainer marks the phases of a step (`PHASE` ranges: batch copy, step counts, forward, loss,
non-finite check, backward, optimizer step, EMA); the report gives each phase's host milliseconds per
step and, on a GPU, how long the GPU sat idle while the host was in it: the phase that owns the idle
time is where the step waits on the host.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType

from eqv2.config import ConfigError


def check_profile_steps(steps: list[int] | None) -> None:
    if steps is None:
        return
    if len(steps) != 2 or not all(isinstance(s, int) for s in steps) or not 1 <= steps[0] <= steps[1]:
        raise ConfigError(f"log.profile_steps must be [first, last] with 1 <= first <= last, got {steps}")


class StepProfiler:
    """Start before step `first`, stop after step `last`; a no-op when `steps` is None."""

    def __init__(self, steps: list[int] | None, run_dir: Path, rank: int, device: torch.device,
                 model: torch.nn.Module | None = None, compiled: list[str] | tuple = ()):
        self.first, self.last = steps if steps else (0, -1)
        self.path = Path(run_dir) / f"profile_rank{rank}.txt"
        self.device = device
        self.model, self.compiled = model, list(compiled)
        self.hooks: list = []
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
        self.hooks = module_ranges(self.model, self.compiled) if self.model is not None else []
        self.t0 = time.perf_counter()

    def after(self, step: int) -> None:
        """Call after step number `step` has run; writes the table after the last profiled step."""
        if self.prof is None or step != self.last:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self.t0
        self._unhook()
        self.prof.__exit__(None, None, None)
        n = self.last - self.first + 1
        head = f"steps {self.first}-{self.last}: {wall / n * 1e3:.1f} ms wall per step (profiler overhead included)\n"
        averages = self.prof.key_averages()
        if self.device.type == "cuda":
            # kernels and copies; not the phase ranges, which the profiler mirrors on the GPU timeline
            kernels = [(e.time_range.start, e.time_range.end) for e in self.prof.events()
                       if e.device_type == DeviceType.CUDA and not e.name.startswith(PHASE)]
            busy, gaps = busy_and_gaps_us(kernels)
            head += (f"GPU busy {busy / n / 1e3:.1f} ms per step ({100 * busy / 1e6 / wall:.0f} % of wall); "
                     f"idle gaps > 1 ms: {len([g for g in gaps if g > 1e3])}, longest {max(gaps, default=0) / 1e3:.1f} ms\n")
        else:
            kernels = []
        phases = [(e.name, e.time_range.start, e.time_range.end) for e in self.prof.events()
                  if e.name.startswith(PHASE) and e.device_type == DeviceType.CPU]
        head += phase_table(phases, kernels, n, gpu=self.device.type == "cuda")
        if self.device.type == "cuda":
            tables = averages.table(sort_by="self_device_time_total", row_limit=60) + "\n## host time\n" + \
                averages.table(sort_by="self_cpu_time_total", row_limit=30)
        else:
            tables = averages.table(sort_by="self_cpu_time_total", row_limit=80)
        self.path.write_text(f"{head}{tables}\n")
        from eqv2.training.profile_breakdown import breakdown

        table = {"first_step": self.first, "last_step": self.last, "wall_ms_per_step": round(wall / n * 1e3, 3),
                 **breakdown(self.prof.events(), n, gpu=self.device.type == "cuda")}
        self.path.with_suffix(".json").write_text(json.dumps(table, indent=1) + "\n")
        self.prof = None

    def _unhook(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks = []

    def close(self) -> None:
        """Stop a profile the run ended inside of (stop signal, error) without writing it."""
        if self.prof is not None:
            self._unhook()
            self.prof.__exit__(None, None, None)
            self.prof = None


def module_ranges(model: torch.nn.Module, compiled: list[str]) -> list:
    """Put a `mod/<class name>` profiler range around the forward of every module of `model` that runs
    outside compiled code (inside a compiled part a range would not be recorded, and a hook added there
    after compilation is not traced); returns the hook handles to remove."""
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)) or \
                any(name.startswith(part + ".") for part in compiled):
            continue
        stack: list = []
        label = MODULE + ("Head" if name in HEADS else type(module).__name__)

        def enter(mod, args, stack=stack, label=label):
            rf = torch.profiler.record_function(label)
            rf.__enter__()
            stack.append(rf)

        def leave(mod, args, out, stack=stack):
            if stack:
                stack.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


HEADS = ("energy_head", "force_head", "stress_head")  # the model's output heads, one category
MODULE = "mod/"  # prefix of the module ranges (training/profile_breakdown.py reads them)


def phase(name: str):
    """A named range of the trainer's step for the profile's phase table (cheap when not profiling)."""
    return torch.profiler.record_function(PHASE + name)


def busy_and_gaps_us(intervals: list[tuple[float, float]]) -> tuple[float, list[float]]:
    """(length of the union of [start, end] intervals, the gaps between its pieces), in their unit."""
    busy, gaps, end = 0.0, [], None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            if end is not None:
                gaps.append(start - end)
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy, gaps


PHASE = "step/"  # prefix of the trainer's phase ranges (torch.profiler.record_function names)


def idle_intervals(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The gaps [end of one busy piece, start of the next] of the union of [start, end] intervals."""
    out, end = [], None
    for start, stop in sorted(intervals):
        if end is not None and start > end:
            out.append((end, start))
        end = stop if end is None else max(end, stop)
    return out


def phase_table(phases: list[tuple[str, float, float]], kernels: list[tuple[float, float]], steps: int,
                gpu: bool) -> str:
    """Per phase name: host ms per step (the union of its ranges) and, with `gpu`, GPU-idle ms per
    step while the host was in it (the idle gaps between `kernels` that overlap its ranges).  The
    idle time inside the profiled window that no phase covers is reported as `(between phases)`."""
    if not phases:
        return ""
    names = sorted({name for name, _, _ in phases})
    gaps = idle_intervals(kernels) if gpu else []
    rows = []
    for name in names:
        ranges = [(a, b) for n, a, b in phases if n == name]
        host, _ = busy_and_gaps_us(ranges)
        idle = sum(_overlap(g, r) for g in gaps for r in _union(ranges))
        rows.append((name, host, idle))
    rows.sort(key=lambda r: -(r[2] if gpu else r[1]))
    lines = ["phase (host ms / step" + (", GPU idle ms / step while the host is in it)" if gpu else ")")]
    for name, host, idle in rows:
        lines.append(f"  {name:<28} {host / steps / 1e3:8.1f}" + (f" {idle / steps / 1e3:8.1f}" if gpu else ""))
    if gpu:
        covered = _union([(a, b) for _, a, b in phases])
        first = min(a for _, a, _ in phases)
        last = max(b for _, _, b in phases)
        inside = [(max(a, first), min(b, last)) for a, b in gaps if b > first and a < last]
        outside = sum(b - a for a, b in inside) - sum(_overlap(g, r) for g in inside for r in covered)
        lines.append(f"  {'(between phases)':<28} {'':>8} {outside / steps / 1e3:8.1f}")
    return "\n".join(lines) + "\n"


def _union(ranges: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _overlap(x: tuple[float, float], y: tuple[float, float]) -> float:
    return max(0.0, min(x[1], y[1]) - max(x[0], y[0]))
