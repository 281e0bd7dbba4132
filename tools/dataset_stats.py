#!/usr/bin/env python
"""Compute (or recompute) a shard set's stats.json by reading every sample: energy mean/std,
forces_std (RMS of the force components), average atoms per structure and average neighbours per
atom (the model's radius graph, by default the paper's 12 Å / 20 neighbours, on structures selected
by id hash, 1 in --degree-every).

The sharding tools already write stats.json from per-shard sums at 12 Å / 20; use this to check it,
to measure avg_degree on more structures, or on the graph of a model with another cutoff
(`model_graph_stats_from_data: true` refuses stats measured on another graph).

Example:
    python tools/dataset_stats.py data/demo/train/manifest.json --max-radius 6 --max-neighbors 12 \
        --degree-every 1 --out /tmp/stats.json
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eqv2.data.format import sample_key  # noqa: E402
from eqv2.data.reader import read_shard, resolve_shards  # noqa: E402
from eqv2.data.stats import (DEGREE_MAX_NEIGHBORS, DEGREE_RADIUS, Accumulator, combine, summarize,  # noqa: E402
                             write_stats)


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest")
    p.add_argument("--shards", default="", help="WebDataset URL spec (default: the shards beside the manifest)")
    p.add_argument("--degree-every", type=int, default=20)
    p.add_argument("--max-radius", type=float, default=DEGREE_RADIUS, help="graph cutoff in Å (model.max_radius)")
    p.add_argument("--max-neighbors", type=int, default=DEGREE_MAX_NEIGHBORS, help="model.max_neighbors")
    p.add_argument("--out", default="", help="write stats JSON here (default: print only)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not args.max_radius > 0 or args.max_neighbors < 1:
        p.error(f"--max-radius must be > 0 and --max-neighbors >= 1, got {args.max_radius} and {args.max_neighbors}")
    graph = (args.max_radius, args.max_neighbors)
    urls, infos, _ = resolve_shards(args.manifest, args.shards)
    sums = []
    for url, info in tqdm(list(zip(urls, infos)), unit="shard", disable=args.no_progress):
        samples, _ = read_shard(url, info, verify=True, on_error="raise")
        acc = Accumulator()
        for s in samples:
            acc.add(summarize(s, sample_key(s["sid"], s["fid"]), args.degree_every, graph))
        sums.append(acc.to_json())
    stats = combine(sums, graph)
    print(json.dumps(asdict(stats), indent=2))
    if args.out:
        write_stats(stats, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
