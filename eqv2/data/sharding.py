"""The sharding driver shared by tools/shard_extxyz.py and tools/shard_lmdb.py.

Sources (input files) are read and encoded by a pool of processes, in parallel, but written by
this process strictly in source order, so the output never depends on the number of processes
or their timing.  Resume: `ShardWriter` reports the source position after the last intact shard
([source index, samples of it already written]); reading restarts there.
"""
from __future__ import annotations

import functools
import multiprocessing as mp
import re
from pathlib import Path
from typing import Callable, Iterator

from eqv2.data.format import encode_sample, sample_key
from eqv2.data.manifest import Manifest
from eqv2.data.stats import DEGREE_GRAPH, combine, summarize, write_stats
from eqv2.data.writer import ShardWriter

ReadFn = Callable[[str], Iterator[dict]]  # source -> its samples in order


def parse_size(text: str) -> int:
    """'256M' -> 268435456; plain integers are bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 512M, 2G, 100000)")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def _encode_source(read_fn: ReadFn, degree_every: int, degree_graph: tuple[float, int],
                   task: tuple[int, str, int]) -> list:
    index, source, skip = task
    out = []
    for j, sample in enumerate(read_fn(source)):
        if j < skip:
            continue
        key = sample_key(sample["sid"], sample["fid"])
        out.append((key, encode_sample(sample), summarize(sample, key, degree_every, degree_graph), [index, j + 1]))
    return out


def shard_sources(
    sources: list[str],
    read_fn: ReadFn,
    out_dir: str | Path,
    prefix: str,
    max_samples: int,
    max_bytes: int,
    workers: int,
    degree_every: int,
    energy_target: str,
    description: str,
    progress: bool = True,
    degree_graph: tuple[float, int] = DEGREE_GRAPH,
) -> Manifest:
    """Write shards + manifest.json + stats.json for `sources`; resumes a killed run in `out_dir`.
    degree_graph: (max_radius, max_neighbors) of the graph avg_degree is measured on."""
    from tqdm import tqdm

    writer = ShardWriter(out_dir, prefix, max_samples=max_samples, max_bytes=max_bytes)
    start, skip = writer.position if writer.position is not None else (0, 0)
    tasks = [(i, s, skip if i == start else 0) for i, s in enumerate(sources) if i >= start]
    encode = functools.partial(_encode_source, read_fn, degree_every, degree_graph)
    seen = set()
    bar = tqdm(total=len(sources), initial=start, unit="file", disable=not progress, desc=prefix)
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(encode, tasks) if pool is not None else map(encode, tasks)
        for encoded in results:
            for key, payload, summary, position in encoded:
                if key in seen:
                    raise ValueError(f"duplicate sample id {key} (in {sources[position[0]]})")
                seen.add(key)
                writer.add(key, payload, summary, position)
            bar.update(1)
            bar.set_postfix(shards=len(writer.shards))
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    manifest = writer.finish(energy_target, description)
    write_stats(combine([s.sums for s in manifest.shards], degree_graph), Path(out_dir) / "stats.json")
    return manifest


def add_sharding_arguments(parser) -> None:
    """The command-line options every sharding tool shares (tools/shard_extxyz.py, tools/shard_lmdb.py)."""
    parser.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    parser.add_argument("--shard-samples", type=int, default=0, help="samples per shard (0 = no limit)")
    parser.add_argument("--shard-bytes", default="0", help="bytes per shard, e.g. 256M (0 = no limit)")
    parser.add_argument("--workers", type=int, default=1, help="parallel reader processes")
    parser.add_argument("--degree-every", type=int, default=20,
                        help="measure avg neighbours on ~1/K of the structures (chosen by id hash; 1 = all, 0 = none)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_sharding_cli(parser, args, sources: list[str], read, energy_target: str, origin: str) -> int:
    """Shard `sources` as the shared options in `args` say; print a one-line summary."""
    max_bytes = parse_size(args.shard_bytes)
    if args.shard_samples <= 0 and max_bytes <= 0:
        parser.error("give --shard-samples and/or --shard-bytes")
    manifest = shard_sources(sources, read, args.out, args.prefix, args.shard_samples, max_bytes, args.workers,
                             args.degree_every, energy_target, origin, progress=not args.no_progress)
    print(f"{args.out}: {len(manifest.shards)} shards, {manifest.num_samples} samples, {manifest.num_atoms} atoms")
    return 0
