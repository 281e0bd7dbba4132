"""How long the compiled model takes to reach steady state, and how many graphs it compiles on the way.

Compiles a model's parts as the trainer does (`training.compile.apply_compile`) and runs forward and
backward on batches of different shapes (slab structures of growing size), printing after each batch the
wall time since the first call and Dynamo's graph count.  `--automatic` replaces the batch-dim marking
(`BATCH_DIMS`, `compile.dynamic: null`) by Dynamo's automatic dynamic shapes alone, the behaviour before
session 19: every part compiled static at the first batch and again, symbolic, at the second.  Point
TORCHINDUCTOR_CACHE_DIR at an empty directory for a cold start:

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python -m diagnostics.first_compiles
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python -m diagnostics.first_compiles --automatic
    python -m diagnostics.first_compiles --device cuda --lmax 6 --mmax 2 --channels 128 --blocks 4
"""
from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--automatic", action="store_true", help="Dynamo's automatic dynamic shapes only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--lmax", type=int, default=4)
    parser.add_argument("--mmax", type=int, default=2)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 3, 4], help="slab repeats per batch")
    args = parser.parse_args(argv)

    import torch
    import torch._dynamo.utils as dynamo_utils

    import eqv2.training.compile as compile_mod
    from eqv2.model.config import ModelConfig
    from eqv2.model.equiformer_v2 import EquiformerV2
    from tests.model.equivariance import batch_from_atoms
    from tests.model.fairchem_reference import slab_structures

    if args.automatic:
        compile_mod._batch_dims_symbolic = lambda compiled, plain: compiled
    torch.manual_seed(0)
    c = args.channels
    cfg = ModelConfig(num_layers=args.blocks, lmax=args.lmax, mmax=args.mmax, sphere_channels=c,
                      attn_hidden_channels=max(c // 2, 8), attn_alpha_channels=8, attn_value_channels=4,
                      ffn_hidden_channels=c, edge_channels=c, num_heads=2, alpha_drop=0.0, drop_path_rate=0.3,
                      max_radius=6.0)
    model = EquiformerV2(cfg).to(args.device).train()
    compile_mod.apply_compile(model, compile_mod.CompileConfig(enabled=True))
    start, rows = time.time(), []
    for i, n in enumerate(args.sizes):
        structures = slab_structures(n, n)[i % 2:]  # the structure count changes too
        batch = batch_from_atoms(structures, torch.float32).to(args.device)
        out = model(batch)
        (out["energy"].sum() + out["forces"].pow(2).sum()).backward()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        rows.append({"batch": i + 1, "atoms": int(batch.pos.shape[0]), "seconds": round(time.time() - start, 1),
                     "graphs": int(dynamo_utils.counters["stats"]["unique_graphs"])})
        print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
