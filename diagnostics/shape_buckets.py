#!/usr/bin/env python
"""Which padded batch shapes (shape buckets) a training run will meet, and at which steps.

Under CUDA graphs (compile.mode reduce-overhead / max-autotune) every batch shape not seen before is
recorded once per rank, and the other ranks wait for it at the next all-reduce, so throughput measured
over an interval that contains one is not steady state.  This tool replays the run's data path on the
CPU (the same shards, plan, shuffle and radius graphs as `eqv2/train.py` with that config and rank
count, no model) and prints, per rank, the steps at which a new shape appears, and the logging
intervals in which no rank meets one.  The trainer logs the same count per interval
(`new_shape_buckets` in metrics.jsonl); tests check that the two agree.  It also reports how unequal the
ranks' padded batches are step by step (`imbalance`): every rank waits for the largest at each step, so
with many ranks, batching by atoms (`data.max_atoms`) instead of by structures may balance them.

    python -m diagnostics.shape_buckets --config configs/train/oc20_all_md_153M.yaml --micro-batch 8 \
        --ranks 2 --steps 200 --log-every 20 [--set data.train_manifest=...] [--out buckets.json]

One micro-batch per step (no gradient accumulation), as bench/scaling.py runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path



def gpu_plan(cfg):
    """The execution plan of `cfg` on a CUDA device in bf16 (the trainer's shape buckets there)."""
    from eqv2.execution import run_plan

    return run_plan(cfg, {"torch_autocast": {"enabled": True}}, "cuda", zero_stage=0)


def new_shape_steps(cfg, rank: int, ranks: int, steps: int) -> tuple[list[int], int, list[tuple[int, int]]]:
    """(steps 1..`steps` at which rank `rank` of `ranks` meets a new padded shape, shapes seen, the padded
    (atoms, edges) of its batch at every step; edges 0 when the loader builds no graphs)."""
    from eqv2.data import TrainStream
    from eqv2.model.graph import GraphBuilder
    from eqv2.training.compile import ShapeBuckets

    graphs = GraphBuilder.for_model(cfg.model) \
        if cfg.data.build_graphs else None
    plan = gpu_plan(cfg)
    buckets = ShapeBuckets(plan.pad_atoms_multiple, plan.pad_edges_multiple)
    stream = TrainStream(cfg.data, rank, ranks, graphs)
    new, padded, step, epoch = [], [], 0, 0
    try:
        while step < steps:
            for batch in stream.epoch_batches(epoch):
                step += 1
                if buckets.count_new([batch]):
                    new.append(step)
                atoms, _, edges = buckets.shape(batch)
                padded.append((atoms, edges or 0))
                if step == steps:
                    break
            epoch += 1
    finally:
        stream.close()
    return new, len(buckets.seen), padded


def imbalance(padded_per_rank: list[list[tuple[int, int]]]) -> dict:
    """Per step, the largest padded atom and edge count of any rank over the mean of the ranks, averaged
    over the steps.  In a synchronous step every rank waits for the slowest, so if a step's time grows
    with its padded size, the mean over ranks / the largest is what the ranks' work allows of weak-scaling
    efficiency (a property of the data and batching, not a throughput measurement)."""
    out = {}
    for i, name in enumerate(("atoms", "edges")):
        ratios = []
        for step in zip(*padded_per_rank):
            sizes = [shape[i] for shape in step]
            mean = sum(sizes) / len(sizes)
            if mean > 0:
                ratios.append(max(sizes) / mean)
        if ratios:
            out[f"max_over_mean_{name}"] = sum(ratios) / len(ratios)
    return out


def quiet_intervals(new_per_rank: list[list[int]], steps: int, log_every: int) -> list[int]:
    """Last steps of the logging intervals (log_every, 2 log_every, ...) in which no rank meets a new shape."""
    new = {s for steps_of_rank in new_per_rank for s in steps_of_rank}
    return [end for end in range(log_every, steps + 1, log_every)
            if not any(s in new for s in range(end - log_every + 1, end + 1))]


def main(argv=None) -> int:
    from eqv2.config import ConfigError
    from eqv2.training.config import load_run_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config (configs/train/*.yaml)")
    p.add_argument("--micro-batch", type=int, required=True, help="structures per rank and step")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--out", type=Path, help="results JSON")
    args = p.parse_args(argv)
    try:
        cfg, _ = load_run_config(args.config, args.set, args.micro_batch)
        plan = gpu_plan(cfg)
    except ConfigError as err:
        print(f"shape_buckets: config error: {err}", file=sys.stderr)
        return 2
    if not (plan.pad_atoms_multiple or plan.pad_edges_multiple):
        print("shape_buckets: the config has no shape buckets (execution.pad_atoms_multiple / pad_edges_multiple)",
              file=sys.stderr)
        return 2
    per_rank, padded = [], []
    for rank in range(args.ranks):
        steps, seen, shapes = new_shape_steps(cfg, rank, args.ranks, args.steps)
        per_rank.append({"rank": rank, "new_at_steps": steps, "shapes": seen})
        padded.append(shapes)
        print(f"rank {rank}: {seen} shapes in {args.steps} steps; new at steps {steps}", flush=True)
    quiet = quiet_intervals([r["new_at_steps"] for r in per_rank], args.steps, args.log_every)
    print(f"intervals of {args.log_every} steps without a new shape on any rank (last step): {quiet}")
    balance = imbalance(padded)
    print("slowest rank's padded batch over the ranks' mean, per step (mean over steps): "
          + ", ".join(f"{k.rsplit('_', 1)[1]} {v:.3f}" for k, v in balance.items()))
    if args.out:
        args.out.write_text(json.dumps({"ranks": per_rank, "log_every": args.log_every, "quiet_intervals": quiet,
                                        "imbalance": balance, "padded": padded}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
