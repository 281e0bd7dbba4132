#!/usr/bin/env python
"""What one full Python garbage collection costs once the model is compiled, with and without gc.freeze().

A full collection walks every object the collector tracks.  After torch.compile the process holds
hundreds of thousands of them (FX graphs, guards, generated code, Inductor's caches; under CUDA graphs
also the graph trees), so a collection at a moment Python picks stalls the training step, and on N
ranks every rank's stall stalls the others.  The trainer therefore freezes the survivors after its
first step and after any step that built graphs (`gc.freeze`, eqv2/training/garbage.py).  This tool
shows why on any device: it builds a model config, compiles it as the trainer does, runs training
steps on batches of several sizes (static, then symbolic compilation; with --mode reduce-overhead,
CUDA-graph recordings per padded shape), then times full collections before and after gc.freeze().

    python -m diagnostics.gc_cost --config 153M --batch-size 2 --steps 3 [--mode reduce-overhead --pad 64 1024]
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from bench.model import eqv2_step_fn, make_batches
from eqv2.execution import ExecutionPlan
from eqv2.config import from_dict, load_yaml
from eqv2.model.config import ModelConfig
from eqv2.model.graph import GraphBuilder


def full_collections(repeats: int) -> list[float]:
    """Seconds of `repeats` full collections, one after another."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gc.collect()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="153M", help="configs/model/eqv2_<NAME>.yaml: 31M 83M 153M 1B_L8")
    p.add_argument("--batch-size", type=int, default=2, help="structures per batch")
    p.add_argument("--steps", type=int, default=3, help="training steps, each on a batch of other sizes")
    p.add_argument("--mode", default="default", choices=["default", "reduce-overhead"], help="compile mode")
    p.add_argument("--pad", nargs=2, type=int, default=[0, 0], metavar=("ATOMS", "EDGES"),
                   help="shape buckets (execution.pad_*_multiple); reduce-overhead needs them")
    p.add_argument("--repeats", type=int, default=3, help="full collections timed before and after the freeze")
    p.add_argument("--json", type=Path, help="write the result here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1")
    if args.mode == "reduce-overhead" and not all(args.pad):
        p.error("--mode reduce-overhead needs --pad ATOMS EDGES (one CUDA graph per padded shape)")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = from_dict(ModelConfig, load_yaml(ROOT / "configs" / "model" / f"eqv2_{args.config}.yaml"))
    plan = ExecutionPlan(pad_atoms_multiple=args.pad[0], pad_edges_multiple=args.pad[1])
    builder = GraphBuilder.for_model(cfg)
    batches = [builder(b).to(device) for b in make_batches(args.batch_size, args.steps, seed=0)]
    gc.collect()
    before = len(gc.get_objects())
    t0 = time.perf_counter()
    _, step = eqv2_step_fn(cfg, device, dtype, compiled=True, mode=args.mode, plan=plan)
    for batch in batches:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    built_s = time.perf_counter() - t0
    tracked = len(gc.get_objects())
    unfrozen = full_collections(args.repeats)
    gc.freeze()
    frozen_count = gc.get_freeze_count()
    frozen = full_collections(args.repeats)
    gc.unfreeze()
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "config": args.config, "mode": args.mode, "steps": args.steps,
              "build_and_steps_s": round(built_s, 1), "tracked_before_model": before, "tracked": tracked,
              "frozen": frozen_count, "full_collection_s": [round(s, 4) for s in unfrozen],
              "full_collection_frozen_s": [round(s, 4) for s in frozen]}
    print(f"{result['device']}, torch {result['torch']}: {args.config} compiled ({args.mode}) and {args.steps} "
          f"steps in {built_s:.0f} s; {tracked:,} tracked objects ({before:,} before the model)")
    print(f"  full collection: {', '.join(f'{s:.3f}' for s in unfrozen)} s")
    print(f"  after gc.freeze() of {frozen_count:,} objects: {', '.join(f'{s:.4f}' for s in frozen)} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
