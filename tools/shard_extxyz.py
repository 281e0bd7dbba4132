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
from eqv2.data.sharding import add_sharding_arguments, run_sharding_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="directory holding *.extxyz or *.extxyz.xz files, each with its *.txt")
    p.add_argument("out", help="output directory for shards, manifest.json, stats.json")
    p.add_argument("--subtract-reference", action="store_true",
                   help="energy target = total - reference energy from the *.txt (adsorption-style)")
    add_sharding_arguments(p)
    args = p.parse_args(argv)
    return run_sharding_cli(p, args, lambda: [str(f) for f in find_inputs(args.input)],
                            functools.partial(read_source, args.subtract_reference),
                            "total_minus_ref" if args.subtract_reference else "total",
                            f"extxyz:{Path(args.input).resolve()}")


if __name__ == "__main__":
    raise SystemExit(main())
