#!/usr/bin/env python
"""Shard OC20's raw S2EF download (*.extxyz[.xz] + *.txt) into eqv2 WebDataset shards.

Writes OUT/<prefix>-NNNNNN.tar, OUT/manifest.json (count, atoms, sha256 per shard) and
OUT/stats.json (normalisers and averages).  Input files are processed in sorted order by N
processes and written in that order, so the output is byte-identical whatever N.  Re-running the
same command after a kill keeps the finished shards and completes the rest identically.

Example:
    python tools/shard_extxyz.py s2ef_train_2M/ data/s2ef_2M/train --workers 16 \
        --shard-bytes 256M --subtract-reference
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eqv2.data.extxyz import find_inputs, read_source  # noqa: E402
from eqv2.data.sharding import parse_size, shard_sources  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="directory holding *.extxyz or *.extxyz.xz files, each with its *.txt")
    p.add_argument("out", help="output directory for shards, manifest.json, stats.json")
    p.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    p.add_argument("--shard-samples", type=int, default=0, help="samples per shard (0 = no limit)")
    p.add_argument("--shard-bytes", default="0", help="bytes per shard, e.g. 256M (0 = no limit)")
    p.add_argument("--workers", type=int, default=1, help="parallel reader processes")
    p.add_argument("--subtract-reference", action="store_true",
                   help="energy target = total - reference energy from the *.txt (adsorption-style)")
    p.add_argument("--degree-every", type=int, default=20,
                   help="measure avg neighbours on ~1/K of the structures (chosen by id hash; 1 = all, 0 = none)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    max_bytes = parse_size(args.shard_bytes)
    if args.shard_samples <= 0 and max_bytes <= 0:
        p.error("give --shard-samples and/or --shard-bytes")
    sources = [str(f) for f in find_inputs(args.input)]
    manifest = shard_sources(
        sources, functools.partial(read_source, args.subtract_reference), args.out, args.prefix,
        args.shard_samples, max_bytes, args.workers, args.degree_every,
        "total_minus_ref" if args.subtract_reference else "total", f"extxyz:{Path(args.input).resolve()}",
        progress=not args.no_progress,
    )
    print(f"{args.out}: {len(manifest.shards)} shards, {manifest.num_samples} samples, {manifest.num_atoms} atoms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
