#!/usr/bin/env python
"""Compute (or recompute) a shard set's stats.json by reading every sample: energy mean/std,
force RMS, average atoms per structure and average neighbours per atom (the model's radius graph,
12 Å / 20 neighbours, on structures selected by id hash, 1 in --degree-every).

The sharding tools already write stats.json from per-shard sums; use this to check it, or to
measure avg_degree on more structures.

Example:
    python tools/dataset_stats.py data/demo/train/manifest.json --degree-every 1 --out /tmp/stats.json
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
from eqv2.data.stats import Accumulator, combine, summarize, write_stats  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest")
    p.add_argument("--shards", default="", help="WebDataset URL spec (default: the shards beside the manifest)")
    p.add_argument("--degree-every", type=int, default=20)
    p.add_argument("--out", default="", help="write stats JSON here (default: print only)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    urls, infos, _ = resolve_shards(args.manifest, args.shards)
    sums = []
    for url, info in tqdm(list(zip(urls, infos)), unit="shard", disable=args.no_progress):
        samples, _ = read_shard(url, info, verify=True, on_error="raise")
        acc = Accumulator()
        for s in samples:
            acc.add(summarize(s, sample_key(s["sid"], s["fid"]), args.degree_every))
        sums.append(acc.to_json())
    stats = combine(sums)
    print(json.dumps(asdict(stats), indent=2))
    if args.out:
        write_stats(stats, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
