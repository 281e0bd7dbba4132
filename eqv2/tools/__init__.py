"""The product's data and model tools, each an `eqv2 <verb>` (eqv2/cli.py lists them).

shard (OC20 raw extxyz + txt), shard-lmdb (fairchem/OCP LMDBs), shard-ase (any ASE-readable file),
inspect (verify shards), stats (a shard set's normalisers), export (a training checkpoint as a model
file), convert (a fairchem checkpoint as a model file), demo-data (the EMT demo dataset).
Each module has a `main(argv) -> int`; `common` holds what they share (parser, errors, progress).
"""
