#!/usr/bin/env python
"""Shape-bucket padding where batches are built (issue 25) against padding in the main process, on one GPU.

For each model config, on the trainer's CUDA bf16 plan (fused kernels, buckets of 64 atoms / 1,024 edges),
batches of OC20-like structures (bench/model.py's) with radius graphs built ahead on the host, run two ways:
- `main`: the batch without a bucket; the plan's hooks pad it on the device in the main process (what the
  model's forward did before the padding moved out);
- `loader`: the bucket built on the host with the graph (`pad_to_bucket`, as the trainer's loader workers do).
Reported per config: the main process's host time for the padding per step (`bucket_of`, µs), training-step
time of both (eager, and compiled as the trainer runs on a GPU), whether their outputs are bitwise equal (eval
mode), and whether a step raises under torch.cuda.set_sync_debug_mode("error") (no host sync).

    python -m bench.padding --configs 31M 153M --steps 20 --compiled 31M --json $OUT/padding.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.model import ROOT, eqv2_step_fn, make_batches, time_steps
from eqv2.buckets import bucket_of, pad_to_bucket
from eqv2.config import from_dict, load_yaml
from eqv2.execution import choose_plan
from eqv2.model.config import ModelConfig
from eqv2.model.graph import GraphBuilder


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def padding_host_us(model, batches, plan, device, repeats: int = 3) -> float:
    """Mean host µs per batch the main process spends getting the bucket `model` runs (device work queued)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        for batch in batches:
            bucket_of(model, batch, plan.pad_atoms_multiple, plan.pad_edges_multiple)
    elapsed = time.perf_counter() - start
    sync(device)
    return elapsed / (repeats * len(batches)) * 1e6


def no_sync(step, batch, device) -> str:
    if device.type != "cuda":
        return "n/a"
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(batch)
        return "ok"
    except RuntimeError as err:
        return f"sync: {str(err).splitlines()[0][:200]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["31M", "153M"])
    p.add_argument("--compiled", nargs="*", default=["31M"], help="configs also timed compiled (compile.mode default)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", type=Path)
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the script (the CUDA plan's buckets)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows, prepared = [], {}
    # eager first for every config, then the compiled ones (a run cut short keeps the cheap rows)
    for name, compiled in [(c, False) for c in args.configs] + [(c, True) for c in args.compiled]:
        cfg = from_dict(ModelConfig, load_yaml(ROOT / "configs" / "model" / f"eqv2_{name}.yaml"))
        plan = choose_plan(device_type="cuda", dtype="bf16", lmax=cfg.lmax, mmax=cfg.mmax, graph_ahead=True)
        if name not in prepared:
            graphs = GraphBuilder.for_model(cfg)
            ahead = [graphs(b) for b in make_batches(args.batch_size, args.warmup + args.steps, seed=0)]
            t0 = time.perf_counter()
            padded = [pad_to_bucket(b, plan.pad_atoms_multiple, plan.pad_edges_multiple) for b in ahead]  # as a worker
            worker_ms = 1e3 * (time.perf_counter() - t0) / len(ahead)
            prepared[name] = ({"main": [b.to(device) for b in ahead], "loader": [b.to(device) for b in padded]},
                              worker_ms)
        inputs, worker_ms = prepared[name]
        impl = "compiled" if compiled else "eager"
        row = {"config": name, "impl": impl, "batch": args.batch_size, "plan": str(plan),
               "worker_padding_ms_per_batch": worker_ms}
        torch.manual_seed(0)
        model, step = eqv2_step_fn(cfg, device, torch.bfloat16, compiled, plan=plan)
        row["main_padding_host_us"] = padding_host_us(model, inputs["main"], plan, device)
        row["loader_padding_host_us"] = padding_host_us(model, inputs["loader"], plan, device)
        for how, batches in inputs.items():
            elapsed, peak, _, warm = time_steps(step, batches, args.warmup, device)
            row[f"{how}_samples_per_s"] = args.batch_size * args.steps / elapsed
            row[f"{how}_peak_gib"] = peak
            row[f"{how}_warmup_s"] = warm
            row[f"{how}_no_sync"] = no_sync(step, batches[-1], device)
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            torch.compiler.cudagraph_mark_step_begin()
            a = {k: v.clone() for k, v in model(inputs["main"][0]).items()}
            b = model(inputs["loader"][0])
        row["outputs_bitwise_equal"] = all(torch.equal(a[k], b[k]) for k in a)
        row["outputs_max_abs_diff"] = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # after every row: a run cut short keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
            args.json.write_text(json.dumps({"device": gpu, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
