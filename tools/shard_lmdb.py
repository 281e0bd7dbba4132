#!/usr/bin/env python
"""Shard fairchem/OCP S2EF LMDBs (data.NNNN.lmdb with pickled torch_geometric Data) into eqv2 shards.

Records are unpickled by a restricted unpickler that admits only torch_geometric Data records and
tensors; a record naming any other global is refused with an error naming the file and key.
LMDB files are processed in sorted order, keys in 0..length-1 order, by N processes, and written in
that order: the output is byte-identical whatever N, and a killed run resumes where it stopped.
The energy target is the stored `y`/`energy` as is (OCP S2EF LMDBs already hold the training target).

Example:
    python tools/shard_lmdb.py s2ef/2M/train/ data/s2ef_2M/train --workers 16 --shard-bytes 256M
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eqv2.data.lmdb_source import find_lmdbs, read_lmdb  # noqa: E402
from eqv2.data.sharding import parse_size, shard_sources  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="LMDB folder (data.NNNN.lmdb files) or one .lmdb file")
    p.add_argument("out", help="output directory for shards, manifest.json, stats.json")
    p.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    p.add_argument("--shard-samples", type=int, default=0, help="samples per shard (0 = no limit)")
    p.add_argument("--shard-bytes", default="0", help="bytes per shard, e.g. 256M (0 = no limit)")
    p.add_argument("--workers", type=int, default=1, help="parallel reader processes")
    p.add_argument("--degree-every", type=int, default=20,
                   help="measure avg neighbours on ~1/K of the structures (chosen by id hash; 1 = all, 0 = none)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    max_bytes = parse_size(args.shard_bytes)
    if args.shard_samples <= 0 and max_bytes <= 0:
        p.error("give --shard-samples and/or --shard-bytes")
    sources = [str(f) for f in find_lmdbs(args.input)]
    manifest = shard_sources(sources, read_lmdb, args.out, args.prefix, args.shard_samples, max_bytes, args.workers,
                             args.degree_every, "as_stored", f"lmdb:{Path(args.input).resolve()}",
                             progress=not args.no_progress)
    print(f"{args.out}: {len(manifest.shards)} shards, {manifest.num_samples} samples, {manifest.num_atoms} atoms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
