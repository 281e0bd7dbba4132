#!/usr/bin/env python
"""Data-loading throughput: eqv2 shards vs a fairchem-format LMDB holding the same samples.

Builds N OC20-sized structures (the real OC20 adslab from tests/assets, tiled to 68 and 102 atoms
and rattled; OC20 S2EF averages ~73-78 atoms), writes them as shards and as an OCP LMDB of pickled
torch_geometric Data, then times read + decode + batch in ONE process (= one worker / core):
  shards        TrainStream(num_workers=0): tar read, sha256 check, decode, shuffle, AtomsBatch
  lmdb+pyg      shuffled LMDB gets, pickle.loads, torch_geometric Batch.from_data_list (fairchem path)
  lmdb+restricted  shuffled LMDB gets, eqv2's restricted unpickler, AtomsBatch
and, for the total, TrainStream with --workers DataLoader processes.  With --graphs the shard rows also
build each batch's radius graph (GraphBuilder, radius 12 Å, <= 20 neighbours), as the trainer's workers
do (data.build_graphs), and a second single-process row without graphs shows what they cost.

Example:
    python -m bench.bench_data --samples 8000 --batch-size 32 --workers 2 [--graphs]
"""
from __future__ import annotations

import argparse
import pickle
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


OC20_JSON = Path(__file__).resolve().parents[1] / "tests" / "assets" / "oc20_adslab.json"  # OC20, CC-BY 4.0


def make_samples(n: int, seed: int) -> list[dict]:
    import ase.io

    base = ase.io.read(OC20_JSON)
    fixed = np.zeros(len(base), bool)
    fixed[base.constraints[0].get_indices()] = True
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        reps = 2 if i % 2 == 0 else 3
        atoms = base.repeat((reps, 1, 1))
        k = len(atoms)
        out.append({
            "sid": str(1000000 + i), "fid": str(i % 7),
            "positions": atoms.positions + rng.normal(0, 0.05, (k, 3)), "numbers": atoms.numbers,
            "cell": atoms.cell.array, "pbc": np.ones(3, bool), "tags": np.tile(base.get_tags(), reps),
            "fixed": np.tile(fixed, reps), "forces": rng.normal(0, 0.3, (k, 3)),
            "energy": float(rng.normal(-1.0, 2.0)),
        })
    return out


def bench_lmdb(path: Path, n: int, batch_size: int, seed: int, mode: str) -> tuple[float, int]:
    import lmdb
    import torch  # noqa: F401
    from torch_geometric.data import Batch

    from eqv2.batch import AtomsBatch
    from eqv2.data.lmdb_source import record_to_sample

    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False, meminit=False)
    order = np.random.default_rng(seed).permutation(n)
    atoms = 0
    t0 = time.perf_counter()
    with env.begin() as txn:
        for start in range(0, n, batch_size):
            keys = order[start : start + batch_size]
            if mode == "pyg":
                batch = Batch.from_data_list([pickle.loads(txn.get(str(k).encode())) for k in keys])
                atoms += int(batch.natoms.sum())
            else:
                samples = [record_to_sample(txn.get(str(k).encode()), "bench", int(k)) for k in keys]
                batch = AtomsBatch.from_arrays(samples, ids=[f"{s['sid']}_{s['fid']}" for s in samples])
                atoms += int(batch.natoms.sum())
    dt = time.perf_counter() - t0
    env.close()
    return dt, atoms


def bench_shards(manifest: Path, batch_size: int, workers: int, graphs: bool = False) -> tuple[float, int, int]:
    from eqv2.data import DataConfig, TrainStream
    from eqv2.model.graph import GraphBuilder

    cfg = DataConfig(train_manifest=str(manifest), batch_size=batch_size, num_workers=workers, shuffle_buffer=2000)
    stream = TrainStream(cfg, 0, 1, GraphBuilder(12.0, 20, 90) if graphs else None)
    t0 = time.perf_counter()
    samples = atoms = 0
    for batch in stream.epoch_batches(0):
        samples += batch.num_graphs
        atoms += int(batch.natoms.sum())
    return time.perf_counter() - t0, samples, atoms


def main(argv: list[str] | None = None) -> int:
    from eqv2.data.format import encode_sample, sample_key
    from eqv2.data.lmdb_source import write_lmdb
    from eqv2.data.stats import summarize
    from eqv2.data.validate import LabelBounds, check_labels, validate_frame
    from eqv2.data.writer import ShardWriter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-samples", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the total-throughput row")
    p.add_argument("--graphs", action="store_true",
                   help="shard rows build radius graphs (12 Å, 20 neighbours) in the loader, as the trainer does")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default="", help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="eqv2-bench-"))
    samples = make_samples(args.samples, args.seed)
    writer = ShardWriter(tmp / "shards", "bench", max_samples=args.shard_samples)
    for i, s in enumerate(samples):
        key = sample_key(s["sid"], s["fid"])
        validate_frame(s, f"bench sample {key}")  # the checks every sharder applies
        check_labels(s, f"bench sample {key}", LabelBounds())
        writer.add(key, encode_sample(s), summarize(s, key, 0), [0, i + 1])
    manifest = writer.finish("total", "bench")
    write_lmdb(tmp / "data.0000.lmdb", samples)
    n, total_atoms = len(samples), manifest.num_atoms
    print(f"# {n} samples, {total_atoms / n:.1f} atoms/sample, batch {args.batch_size}, "
          f"{platform.processor() or platform.machine()}, python {platform.python_version()}")
    print("| path | processes | samples/s | atoms/s | samples/s per process |")
    print("|---|---|---|---|---|")
    rows = []
    graphs = " + radius graphs" if args.graphs else ""
    if args.graphs:
        dt, seen, atoms = bench_shards(tmp / "shards/manifest.json", args.batch_size, 0, True)
        assert seen == n
        rows.append(("shards (eqv2 TrainStream)" + graphs, 1, n / dt, atoms / dt))
    dt, seen, atoms = bench_shards(tmp / "shards/manifest.json", args.batch_size, 0)
    assert seen == n
    rows.append(("shards (eqv2 TrainStream)", 1, n / dt, atoms / dt))
    for mode, name in (("pyg", "LMDB + pickle + PyG Batch (fairchem path)"), ("restricted", "LMDB + restricted unpickler + AtomsBatch")):
        dt, atoms = bench_lmdb(tmp / "data.0000.lmdb", n, args.batch_size, args.seed, mode)
        rows.append((name, 1, n / dt, atoms / dt))
    if args.workers > 0:
        dt, seen, atoms = bench_shards(tmp / "shards/manifest.json", args.batch_size, args.workers, args.graphs)
        rows.append(("shards (eqv2 TrainStream)" + graphs, args.workers, n / dt, atoms / dt))
    for name, procs, sps, aps in rows:
        print(f"| {name} | {procs} | {sps:,.0f} | {aps:,.0f} | {sps / procs:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
