"""Shard OC20's raw S2EF download (*.extxyz[.xz] + *.txt) into eqv2 WebDataset shards.

Writes OUT/<prefix>-NNNNNN.tar, OUT/manifest.json (count, atoms, sha256 per shard) and
OUT/stats.json (normalisers and averages).  Input files are processed in sorted order by N
processes and written in that order, so the output is byte-identical whatever N.  Re-running the
same command after a kill keeps the finished shards and completes the rest identically.
"""
from __future__ import annotations

import functools
from pathlib import Path

from eqv2.data.extxyz import find_inputs, read_source
from eqv2.data.sharding import add_sharding_arguments, run_sharding_cli
from eqv2.tools.common import parser

EXAMPLES = [
    "eqv2 shard s2ef_train_2M/ data/s2ef_2M/train --workers 16 --shard-bytes 256M --subtract-reference",
    "eqv2 shard s2ef_val_id/ data/val_id --shard-bytes 256M --subtract-reference",
    "eqv2 shard s2ef_test_id/ data/test_id --shard-bytes 256M --unlabelled   # a test split, for predictions",
]


def main(argv: list[str] | None = None) -> int:
    p = parser("shard", __doc__, EXAMPLES)
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
