"""Verify shards against their manifest (sha256, sample counts, atom counts, every sample decodes)
and print a few samples.  Exit status 1 if anything is wrong, each problem named by shard and key;
2 for a missing or unreadable manifest.
"""
from __future__ import annotations

import numpy as np

from eqv2.data.reader import ShardError, read_shard, resolve_shards
from eqv2.tools.common import add_quiet, fail, parser, progress

EXAMPLES = [
    "eqv2 inspect data/demo/train/manifest.json --show 2",
    "eqv2 inspect data/s2ef_2M/train/manifest.json --shards 'data/s2ef_2M/train/shard-{000000..000009}.tar'",
]


def describe(url: str, s: dict) -> str:
    """One line about a decoded sample: size, elements, energy, largest force, tags, fixed atoms."""
    e, f, tags, fixed = s.get("energy"), s.get("forces"), s.get("tags"), s.get("fixed")
    return (f"{url} {s['sid']}_{s['fid']}: {len(s['numbers'])} atoms, Z={sorted(set(s['numbers'].tolist()))}, "
            f"energy={float(e) if e is not None else None}, "
            f"|F|max={float(np.abs(f).max()) if f is not None else None}, "
            f"tags={np.bincount(tags, minlength=3).tolist() if tags is not None else None}, "
            f"fixed={int(fixed.sum()) if fixed is not None else None}")


def main(argv: list[str] | None = None) -> int:
    p = parser("inspect", __doc__, EXAMPLES)
    p.add_argument("manifest", help="manifest.json of a shard set")
    p.add_argument("--shards", default="", help="WebDataset URL spec (default: the shards beside the manifest)")
    p.add_argument("--show", type=int, default=1, help="print this many samples")
    add_quiet(p)
    args = p.parse_args(argv)
    if args.show < 0:
        p.error(f"--show must be >= 0, got {args.show}")
    try:
        urls, infos, manifest = resolve_shards(args.manifest, args.shards)
    except (FileNotFoundError, ValueError, ShardError) as err:  # a missing or unreadable manifest: one line
        return fail("inspect", str(err))
    problems, shown, samples, atoms = [], 0, 0, 0
    for url, info in progress(list(zip(urls, infos)), args.quiet, unit="shard", desc="inspect"):
        loaded, errors = read_shard(url, info, verify=True, on_error="skip")
        problems += errors
        good = [s for s in loaded if s is not None]
        n_atoms = sum(len(s["numbers"]) for s in good)
        if not errors and n_atoms != info.atoms:
            problems.append(f"shard {url}: {n_atoms} atoms, the manifest says {info.atoms}")
        samples += len(good)
        atoms += n_atoms
        for s in good[: max(0, args.show - shown)]:
            shown += 1
            print(describe(url, s))
    print(f"{len(urls)} shards, {samples} good samples of {manifest.num_samples}, {atoms} atoms, "
          f"energy target: {manifest.energy_target}")
    for msg in problems:
        print("PROBLEM:", msg)
    return 1 if problems else 0
