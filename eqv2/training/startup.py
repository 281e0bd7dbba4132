"""Launch to first step: where the trainer's start-up time goes.

`StartupClock` marks the end of each start-up phase on the trainer's own clock, counted from the
moment the operating system started this process (Linux: /proc/self/stat; elsewhere the import of
this module), so Python's start, the imports of torch / DeepSpeed and the distributed initialisation
are included.  The phases, in order:

- `imports_init_s`: process start → `train()` entered (interpreter, imports, config, process group);
- `setup_s`: the run directory's checks and resume point, normalisers / energy references;
- `data_s`: `build_data` (training stream opened, validation splits planned);
- `model_s`: `build_model` (built, initialised, execution plan applied, compile and checkpointing wrapped);
- `engine_s`: `build_engine` (optimizer, DeepSpeed engine, EMA);
- `resume_s`: restoring a checkpoint and writing the resolved configs, up to the loop's start;
- `first_step_s`: the first optimizer step, to the end of its GPU work (the first batch's wait, the
  compilation of the blocks and any CUDA-graph recording happen here);
- `launch_to_first_step_s`: the sum, process start → first step done;
- `compile_cache`: the on-disk compile cache's directory and its hits and misses up to then.

Written once by the main rank: `startup.json` in the run directory and a `startup` entry in the first
metrics.jsonl record (bench/scaling.py and bench/run.py read the file).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

PHASES = ("imports_init_s", "setup_s", "data_s", "model_s", "engine_s", "resume_s", "first_step_s")


def process_start_epoch() -> float:
    """Wall-clock (epoch) seconds at which the OS started this process; the import time of this module
    where /proc is not there."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/self/stat") as f:  # field 22: start time in clock ticks after boot
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + start_ticks / ticks
    except (OSError, ValueError, IndexError):
        return _IMPORTED


_IMPORTED = time.time()


class StartupClock:
    """Phase ends on the wall clock; `mark(name)` closes phase `name` (one of PHASES) now."""

    def __init__(self) -> None:
        self.start = process_start_epoch()
        self.last = self.start
        self.phases: dict[str, float] = {}

    def mark(self, name: str) -> None:
        if name not in PHASES:
            raise ValueError(f"unknown start-up phase {name!r}")
        now = time.time()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.last
        self.last = now

    def first_step_done(self, device: torch.device) -> dict:
        """Close `first_step_s` once the first step's device work has finished (one synchronisation,
        once per run); returns the record."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.mark("first_step_s")
        return self.record()

    def record(self) -> dict:
        out = {name: round(self.phases.get(name, 0.0), 3) for name in PHASES}
        out["launch_to_first_step_s"] = round(self.last - self.start, 3)
        out["process_start_epoch"] = round(self.start, 3)
        out["compile_cache"] = compile_cache_state()
        return out

    @staticmethod
    def write(run_dir: Path, record: dict) -> None:
        path = Path(run_dir) / "startup.json"
        path.write_text(json.dumps(record, indent=1) + "\n")


def compile_cache_state() -> dict:
    """Where torch.compile's on-disk caches are and how the compilations so far used them: Inductor's
    compiled-graph cache (hits: graphs loaded instead of compiled, e.g. by a requeued job or another run of
    the same config sharing the directory, slurm/lib.sh) and AOTAutograd's.  Zero counts: nothing compiled."""
    from torch._dynamo.utils import counters
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    inductor = counters["inductor"]
    aot = counters["aot_autograd"]
    return {"dir": cache_dir(), "fxgraph_hits": int(inductor["fxgraph_cache_hit"]),
            "fxgraph_misses": int(inductor["fxgraph_cache_miss"]),
            "aot_autograd_hits": int(aot["autograd_cache_hit"]), "aot_autograd_misses": int(aot["autograd_cache_miss"])}
