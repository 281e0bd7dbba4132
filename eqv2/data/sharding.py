"""The sharding driver shared by `eqv2 shard`, `eqv2 shard-lmdb` and `eqv2 shard-ase` (eqv2/tools/).

Sources (input files) are read and encoded by a pool of processes, in parallel, but written by
this process strictly in source order, so the output never depends on the number of processes
or their timing.  Resume: `ShardWriter` reports the source position after the last intact shard
([source index, samples of it already written]); reading restarts there.
"""
from __future__ import annotations

import functools
import multiprocessing as mp
import re
import sys
from pathlib import Path
from typing import Callable, Iterator

from eqv2.data.format import SampleError, encode_sample, sample_key
from eqv2.data.lmdb_source import UnsafePickleError
from eqv2.data.manifest import Manifest
from eqv2.data.stats import DEGREE_GRAPH, combine, summarize, write_stats
from eqv2.data.validate import LabelBounds, check_labels, validate_frame
from eqv2.data.writer import ShardWriter

ReadFn = Callable[[str], Iterator[tuple[str, "dict | SampleError"]]]  # source -> (where, sample or its error)
_SHOWN_SKIPS = 10  # skipped frames named on stderr; the rest are only counted


def parse_size(text: str) -> int:
    """'256M' -> 268435456; plain integers are bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 512M, 2G, 100000)")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def _encode_source(read_fn: ReadFn, degree_every: int, degree_graph: tuple[float, int], bounds: LabelBounds,
                   on_error: str, task: tuple[int, str, int]) -> list:
    """(key, payload, summary, position, where) per good frame; (None, message, None, position, where)
    per bad one with on_error="skip" (with "raise" the first bad frame raises SampleError)."""
    index, source, skip = task
    out = []
    for j, (where, sample) in enumerate(read_fn(source)):
        if j < skip:
            continue
        try:
            if isinstance(sample, SampleError):
                raise sample
            validate_frame(sample, where)
            check_labels(sample, where, bounds)
            key = sample_key(sample["sid"], sample["fid"])
            out.append((key, encode_sample(sample), summarize(sample, key, degree_every, degree_graph),
                        [index, j + 1], where))
        except SampleError as err:
            if on_error != "skip":
                raise SampleError(str(err)) from None  # no chained traceback from a pool worker
            out.append((None, str(err), None, [index, j + 1], where))
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
    bounds: LabelBounds = LabelBounds(),
    on_error: str = "raise",
    degree_graph: tuple[float, int] = DEGREE_GRAPH,
) -> Manifest:
    """Write shards + manifest.json + stats.json for `sources`; resumes a killed run in `out_dir`.

    Every frame passes `validate_frame` and `check_labels(bounds)`; a bad one raises SampleError naming
    file and frame, or with on_error="skip" is left out, named on stderr (the first few) and counted in
    the manifest's `skipped_frames`.  degree_graph: (max_radius, max_neighbors) of the graph avg_degree
    is measured on.
    """
    from tqdm import tqdm

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    writer = ShardWriter(out_dir, prefix, max_samples=max_samples, max_bytes=max_bytes)
    start, skip = writer.position if writer.position is not None else (0, 0)
    skipped = writer.skipped  # frames skipped before the resume position
    tasks = [(i, s, skip if i == start else 0) for i, s in enumerate(sources) if i >= start]
    encode = functools.partial(_encode_source, read_fn, degree_every, degree_graph, bounds, on_error)
    seen = set()
    # progress=True: a bar with ETA when stderr is a terminal (disable=None), none in a log file
    bar = tqdm(total=len(sources), initial=start, unit="file", disable=None if progress else True, desc=prefix)
    workers = min(workers, len(tasks))  # one source per task: more processes would only start up and idle
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(encode, tasks) if pool is not None else map(encode, tasks)
        for encoded in results:
            for key, payload, summary, position, where in encoded:
                if key in seen:
                    payload = f"{where}: duplicate sample id {key} (an earlier frame has the same sid and fid)"
                    if on_error != "skip":
                        raise SampleError(payload)
                    key = None
                if key is None:
                    if skipped < _SHOWN_SKIPS:
                        bar.write(f"skipped: {payload}", file=sys.stderr)
                    skipped += 1
                    continue
                seen.add(key)
                writer.add(key, payload, summary, position, skipped)
            bar.update(1)
            bar.set_postfix(shards=len(writer.shards))
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    manifest = writer.finish(energy_target, description, skipped)
    write_stats(combine([s.sums for s in manifest.shards], degree_graph), Path(out_dir) / "stats.json")
    return manifest


def add_sharding_arguments(parser) -> None:
    """The command-line options every sharding verb shares (eqv2/tools/shard*.py)."""
    from eqv2.tools.common import add_quiet

    parser.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    parser.add_argument("--shard-samples", type=int, default=0, help="samples per shard (0 = no limit)")
    parser.add_argument("--shard-bytes", default="0", help="bytes per shard, e.g. 256M (0 = no limit)")
    parser.add_argument("--workers", type=int, default=1, help="parallel reader processes")
    parser.add_argument("--degree-every", type=int, default=20,
                        help="measure avg neighbours on ~1/K of the structures (chosen by id hash; 1 = all, 0 = none)")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                        help="a bad frame: raise = stop naming file and frame (exit 2); skip = leave it out, "
                             "count it (manifest skipped_frames)")
    parser.add_argument("--max-energy-per-atom", type=float, default=LabelBounds.max_energy_per_atom,
                        help="refuse frames whose |energy| per atom exceeds this, eV (default: %(default)s)")
    parser.add_argument("--max-force", type=float, default=LabelBounds.max_force,
                        help="refuse frames with a |force component| above this, eV/Å (default: %(default)s)")
    parser.add_argument("--unlabelled", action="store_true",
                        help="frames need no energy or forces (a test split, for predictions only; "
                             "training refuses such shards)")
    add_quiet(parser)


def run_sharding_cli(parser, args, find_sources: Callable[[], list[str]], read, energy_target: str,
                     origin: str) -> int:
    """Shard the sources `find_sources()` lists as the shared options in `args` say; print a one-line
    summary.  Bad input (a bad frame, a missing file) is one line on stderr and exit status 2."""
    try:
        max_bytes = parse_size(args.shard_bytes)
    except ValueError as err:
        parser.error(f"--shard-bytes: {err}")
    if args.workers < 1 or args.degree_every < 0 or args.shard_samples < 0:
        parser.error("--workers must be >= 1, --degree-every and --shard-samples >= 0")
    if args.shard_samples <= 0 and max_bytes <= 0:
        parser.error("give --shard-samples and/or --shard-bytes")
    try:
        bounds = LabelBounds(args.max_energy_per_atom, args.max_force, require=not args.unlabelled)
    except ValueError as err:
        parser.error(str(err).replace("max_energy_per_atom", "--max-energy-per-atom").replace("max_force", "--max-force"))
    try:
        manifest = shard_sources(find_sources(), read, args.out, args.prefix, args.shard_samples, max_bytes,
                                 args.workers, args.degree_every, energy_target, origin,
                                 progress=not args.quiet, bounds=bounds, on_error=args.on_error)
    except (SampleError, UnsafePickleError, FileNotFoundError) as err:
        print(f"{parser.prog}: {err}", file=sys.stderr, flush=True)
        return 2
    skipped = f", {manifest.skipped_frames} bad frames skipped" if manifest.skipped_frames else ""
    print(f"{args.out}: {len(manifest.shards)} shards, {manifest.num_samples} samples, {manifest.num_atoms} atoms"
          f"{skipped}")
    return 0
