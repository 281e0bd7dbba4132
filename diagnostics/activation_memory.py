#!/usr/bin/env python
"""Activation memory of the compiled model per `compile.activation_memory_budget`, on any device.

For each budget a fresh process compiles the model (compiled code is cached per process, so one budget
each) and runs forward passes on one and on two OC20-like structures (bench/model.py's generator),
recording the distinct storages autograd keeps for the backward pass.  The difference between the two
is the activation memory of one structure (parameters and constants cancel); it scales with the
number of edges, so it predicts the GPU's activation memory at any batch size, in the dtype used
(float32 here; bf16 autocast halves it).  The partitioner's choices do not depend on the device.

    python -m diagnostics.activation_memory --config 153M --budgets 1.0 0.5 0.3 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def measure(config: str, budget: float, device: str) -> dict:
    """One budget, in this process."""
    from bench.model import make_batches

    from eqv2.config import from_dict, load_yaml
    from eqv2.model.config import ModelConfig
    from eqv2.model.equiformer_v2 import EquiformerV2
    from eqv2.training.compile import CompileConfig, apply_compile, saved_for_backward_bytes

    cfg = from_dict(ModelConfig, load_yaml(ROOT / "configs" / "model" / f"eqv2_{config}.yaml"))
    torch.manual_seed(0)
    model = EquiformerV2(cfg).to(device).train()
    apply_compile(model, CompileConfig(enabled=True, activation_memory_budget=budget))
    one, two = make_batches(1, 1, 0)[0], make_batches(2, 1, 0)[0]
    sizes, seconds = [], []
    for batch in (one, two, one, two):  # the first two compile (static, then dynamic shapes)
        batch = batch.to(device)
        start = time.perf_counter()
        nbytes, out = saved_for_backward_bytes(model, batch)
        (out["energy"].sum() + out["forces"].pow(2).sum()).backward()
        model.zero_grad(set_to_none=True)
        sizes.append(nbytes)
        seconds.append(time.perf_counter() - start)
    return {"config": config, "budget": budget, "device": device, "atoms": [int(one.natoms.sum()), int(two.natoms.sum())],
            "saved_mib": [sizes[2] / 2**20, sizes[3] / 2**20],
            "per_structure_mib": (sizes[3] - sizes[2]) / 2**20, "step_s_after_compile": seconds[2:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="153M", help="31M 83M 153M ... (configs/model/eqv2_<name>.yaml)")
    p.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.5])
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path)
    p.add_argument("--one", type=float, help=argparse.SUPPRESS)  # internal: measure this budget here
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.config, args.one, args.device)))
        return 0
    rows = []
    for budget in args.budgets:
        proc = subprocess.run([sys.executable, __file__, "--config", args.config, "--device", args.device,
                               "--one", str(budget)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"budget {budget}: measurement failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{args.config} budget {budget:g}: {r['per_structure_mib']:.0f} MiB of activations per structure "
              f"({r['atoms'][1] - r['atoms'][0]} atoms), {r['saved_mib'][1]:.0f} MiB saved in all for "
              f"{r['atoms'][1]} atoms; step {r['step_s_after_compile'][1]:.2f} s on {args.device}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
