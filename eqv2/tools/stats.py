"""Compute (or recompute) a shard set's stats.json by reading every sample: energy mean/std,
forces_std (RMS of the force components), average atoms per structure and average neighbours per
atom (the model's radius graph, by default the paper's 12 Å / 20 neighbours, on structures selected
by id hash, 1 in --degree-every).

The sharding verbs already write stats.json from per-shard sums at 12 Å / 20; use this to check it,
to measure avg_degree on more structures, or on the graph of a model with another cutoff
(`model_graph_stats_from_data: true` refuses stats measured on another graph).
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict

from eqv2.data.format import SampleError, sample_key
from eqv2.data.reader import read_shard, resolve_shards
from eqv2.data.stats import DEGREE_MAX_NEIGHBORS, DEGREE_RADIUS, Accumulator, combine, summarize, write_stats
from eqv2.tools.common import add_quiet, fail, parser, progress

EXAMPLES = [
    "eqv2 stats data/demo/train/manifest.json --max-radius 6 --max-neighbors 12 --degree-every 1 --out /tmp/stats.json",
    "eqv2 stats data/s2ef_2M/train/manifest.json --out data/s2ef_2M/train/stats.json   # the paper's 12 Å / 20",
]


def main(argv: list[str] | None = None) -> int:
    p = parser("stats", __doc__, EXAMPLES)
    p.add_argument("manifest", help="manifest.json of a shard set")
    p.add_argument("--shards", default="", help="WebDataset URL spec (default: the shards beside the manifest)")
    p.add_argument("--degree-every", type=int, default=20,
                   help="measure avg neighbours on ~1/K of the structures (by id hash; 1 = all, 0 = none)")
    p.add_argument("--max-radius", type=float, default=DEGREE_RADIUS, help="graph cutoff in Å (model.max_radius)")
    p.add_argument("--max-neighbors", type=int, default=DEGREE_MAX_NEIGHBORS, help="model.max_neighbors")
    p.add_argument("--out", default="", help="write stats JSON here (default: print only)")
    add_quiet(p)
    args = p.parse_args(argv)
    if not args.max_radius > 0 or args.max_neighbors < 1:
        p.error(f"--max-radius must be > 0 and --max-neighbors >= 1, got {args.max_radius} and {args.max_neighbors}")
    if args.degree_every < 0:
        p.error(f"--degree-every must be >= 0, got {args.degree_every}")
    graph = (args.max_radius, args.max_neighbors)
    try:
        urls, infos, _ = resolve_shards(args.manifest, args.shards)
        sums = []
        for url, info in progress(list(zip(urls, infos)), args.quiet, unit="shard", desc="stats"):
            samples, _ = read_shard(url, info, verify=True, on_error="raise")
            acc = Accumulator()
            for s in samples:
                acc.add(summarize(s, sample_key(s["sid"], s["fid"]), args.degree_every, graph))
            sums.append(acc.to_json())
    except (FileNotFoundError, ValueError) as err:  # a missing or unreadable manifest
        return fail("stats", str(err))
    except SampleError as err:  # a damaged shard or sample (ShardError is a SampleError)
        return fail("stats", f"{err} (eqv2 inspect {args.manifest} lists every problem)")
    stats = combine(sums, graph)
    print(json.dumps(asdict(stats), indent=2))
    if args.out:
        try:
            write_stats(stats, args.out)
        except OSError as err:
            return fail("stats", f"--out {args.out}: cannot write ({err.strerror})")
        print(f"eqv2 stats: wrote {args.out}", file=sys.stderr)
    return 0
