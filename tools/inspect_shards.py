#!/usr/bin/env python
"""Verify shards against their manifest (sha256, sample counts, atom counts, every sample decodes)
and print a few samples.  Exit status 1 if anything is wrong, each problem named by shard and key.

Example:
    python tools/inspect_shards.py data/demo/train/manifest.json --show 2
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eqv2.data.reader import read_shard, resolve_shards  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="manifest.json of a shard set")
    p.add_argument("--shards", default="", help="WebDataset URL spec (default: the shards beside the manifest)")
    p.add_argument("--show", type=int, default=1, help="print this many samples")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        urls, infos, manifest = resolve_shards(args.manifest, args.shards)
    except (FileNotFoundError, ValueError) as err:  # a missing or unreadable manifest: one line
        print(f"inspect_shards: {err}", file=sys.stderr)
        return 2
    problems, shown, samples, atoms = [], 0, 0, 0
    for url, info in tqdm(list(zip(urls, infos)), unit="shard", disable=args.no_progress):
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
            e = s.get("energy")
            f = s.get("forces")
            print(f"{url} {s['sid']}_{s['fid']}: {len(s['numbers'])} atoms, Z={sorted(set(s['numbers'].tolist()))}, "
                  f"energy={float(e) if e is not None else None}, "
                  f"|F|max={float(np.abs(f).max()) if f is not None else None}, "
                  f"tags={np.bincount(s['tags'], minlength=3).tolist() if s.get('tags') is not None else None}, "
                  f"fixed={int(s['fixed'].sum()) if s.get('fixed') is not None else None}")
    print(f"{len(urls)} shards, {samples} good samples of {manifest.num_samples}, {atoms} atoms, "
          f"energy target: {manifest.energy_target}")
    for msg in problems:
        print("PROBLEM:", msg)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
