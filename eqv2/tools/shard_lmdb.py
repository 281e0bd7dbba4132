"""Shard fairchem/OCP S2EF LMDBs (data.NNNN.lmdb with pickled torch_geometric Data) into eqv2 shards.

Records are unpickled by a restricted unpickler that admits only torch_geometric Data records and
tensors; a record naming any other global is refused with an error naming the file and key.
LMDB files are processed in sorted order, keys in 0..length-1 order, by N processes, and written in
that order: the output is byte-identical whatever N, and a killed run resumes where it stopped.
The energy target is the stored `y`/`energy` as is (OCP S2EF LMDBs already hold the training target).
"""
from __future__ import annotations

from pathlib import Path

from eqv2.data.lmdb_source import find_lmdbs, read_lmdb
from eqv2.data.sharding import add_sharding_arguments, run_sharding_cli
from eqv2.tools.common import parser

EXAMPLES = [
    "eqv2 shard-lmdb s2ef/2M/train/ data/s2ef_2M/train --workers 16 --shard-bytes 256M",
    "eqv2 shard-lmdb s2ef/all/val_id/data.0000.lmdb data/val_id_part --shard-samples 5000",
]


def main(argv: list[str] | None = None) -> int:
    p = parser("shard-lmdb", __doc__, EXAMPLES)
    p.add_argument("input", help="LMDB folder (data.NNNN.lmdb files) or one .lmdb file")
    p.add_argument("out", help="output directory for shards, manifest.json, stats.json")
    add_sharding_arguments(p)
    args = p.parse_args(argv)
    return run_sharding_cli(p, args, lambda: [str(f) for f in find_lmdbs(args.input)], read_lmdb, "as_stored",
                            f"lmdb:{Path(args.input).resolve()}")
