#!/usr/bin/env python
"""S2EF evaluation throughput: structures/s and peak memory of the model's forward pass (energies and forces,
no loss) for eqv2's inference paths and fairchem-core 1.10.0's forward, on the same OC20-sized batches and
the same (random) weights, in one process.

    python -m bench.evaluate --models 153M --batch-sizes 8 16 32 --impls fast fp32 --reference --json $OUT/eval.json

Batches: bench/model.py's OC20-like adsorbate+slab structures (~72 atoms), graphs built ahead on the host as
`eqv2 evaluate`'s loader builds them; each timed step copies its batch to the device and ends with the outputs
on the host (as the evaluator's metrics need them). Impls: `fp32` (eqv2.load_model's reference path), `bf16`
(autocast only: eager, reference modules), `fast` (eqv2.inference with precision bf16: the plan's fused kernels,
compiled, CUDA graphs per shape bucket). Each eqv2 impl's first batch is also checked against fp32 (max |dE| per
atom, max |dF|: recorded, not judged, since random weights have no physical scale). fairchem: its EquiformerV2
under fp16 autocast, as its trainer predicts with amp (its forward keeps the autograd graph: see issue 23).
For `fast` the warm-up runs every timed batch twice (compilation, CUDA-graph recording), so the timed steps are
replays; the other impls warm up on one batch.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from bench.relax import models


def make_batches(batch_size: int, count: int, cfg, seed: int = 0) -> list:
    from bench.model import make_batches as structures
    from eqv2.model.graph import GraphBuilder

    build = GraphBuilder.for_model(cfg)
    return [build(b) for b in structures(batch_size, count, seed)]


def _timed(run, batches, device, compiled: bool = False) -> dict:
    for b in (batches + batches) if compiled else batches[:1]:  # compiled: compile + record every shape
        run(b)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for b in batches:
        run(b)
    sync()
    wall = time.perf_counter() - t0
    structures = sum(int(b.num_graphs) for b in batches)
    return {"structures_per_s": structures / wall, "wall_s": wall, "structures": structures,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0}


def eqv2_runner(potential, impl: str, device):
    from eqv2.inference import InferenceOptions, prepare

    if impl == "fast":
        fast = prepare(copy.deepcopy(potential), device, InferenceOptions(
            precision="bf16", check_batches=1, energy_tolerance=1e30, forces_tolerance=1e30), log=lambda line: None)
        return fast, lambda b: {k: v.cpu() for k, v in fast(b.to(device, non_blocking=True)).items()}
    low = impl == "bf16"

    @torch.no_grad()
    def run(b):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=low):
            out = potential(b.to(device, non_blocking=True))
        return {k: v.float().cpu() for k, v in out.items()}
    return None, run


def fairchem_runner(model, device):
    from torch_geometric.data import Data

    def run(b):
        b = b.to(device, non_blocking=True)
        data = Data(pos=b.pos, atomic_numbers=b.atomic_numbers.float(), cell=b.cell, natoms=b.natoms, batch=b.batch)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            out = model(data)
        return {"energy": out["energy"].float().detach().cpu(), "forces": out["forces"].float().detach().cpu()}
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["153M"], help="NAME (eqv2/configs/model/eqv2_NAME.yaml) or CONFIG.yaml")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 16, 32])
    p.add_argument("--batches", type=int, default=6, help="timed batches per setting")
    p.add_argument("--impls", nargs="+", choices=["fast", "bf16", "fp32"], default=["fast", "fp32"])
    p.add_argument("--reference", action="store_true", help="also fairchem-core 1.10.0's forward (fp16 autocast)")
    p.add_argument("--fp32-batch-sizes", nargs="+", type=int, default=None, help="for impl fp32 (default: --batch-sizes)")
    p.add_argument("--reference-batch-sizes", nargs="+", type=int, default=[8])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = []

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # rewritten after every row: a run cut short keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"results": rows}, indent=2) + "\n")

    for name in args.models:
        ref, potential = models(name, device)
        for impl in args.impls:
            torch._dynamo.reset()
            prepared, run = eqv2_runner(potential, impl, device)
            for bs in (args.fp32_batch_sizes or args.batch_sizes) if impl == "fp32" else args.batch_sizes:
                batches = make_batches(bs, args.batches, potential.config, seed=bs)
                try:
                    row = {"model": name, "impl": f"eqv2_{impl}", "batch": bs, **_timed(run, batches, device, impl == "fast")}
                except torch.OutOfMemoryError as err:
                    row = {"model": name, "impl": f"eqv2_{impl}", "batch": bs, "error": str(err)[:300]}
                    torch.cuda.empty_cache()
                if prepared is not None:
                    row["inference"] = prepared.describe()
                    row["check_vs_fp32"] = [c.__dict__ for c in prepared.checks]
                record(row)
            del prepared, run
        if args.reference and ref is not None:
            run = fairchem_runner(ref, device)
            for bs in args.reference_batch_sizes:
                batches = make_batches(bs, args.batches, potential.config, seed=bs)
                try:
                    row = {"model": name, "impl": "fairchem_amp16", "batch": bs, **_timed(run, batches, device)}
                except torch.OutOfMemoryError as err:
                    row = {"model": name, "impl": "fairchem_amp16", "batch": bs, "error": str(err)[:300]}
                    torch.cuda.empty_cache()
                record(row)
        del ref, potential
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
