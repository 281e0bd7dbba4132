"""Shard any ASE-readable dataset (extxyz, ASE db, traj, ...) into eqv2 WebDataset shards.

For a user's own DFT data: energies and forces from each frame's calculator results (what ASE reads
from extxyz / db / traj files) or from `info` / `arrays` keys you name; stress when present; FixAtoms
constraints when present; OC20-style tags with --tags. The energy target is the total energy as stored. With
--val-fraction the frames are split into OUT/train and OUT/val by a hash of their system id (the
file, or an `info` key: --system-key), so frames of one system never land on both sides, or by a hash
of each structure (--split-by structure). Inputs are processed in sorted order by N processes and
written in that order (the output does not depend on N); a killed run resumes.
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

from eqv2.data.ase_source import AseKeys, Split, find_ase_inputs, read_ase
from eqv2.data.sharding import add_sharding_arguments, run_sharding_cli
from eqv2.tools.common import fail, parser

EXAMPLES = [
    "eqv2 shard-ase my_dft/ data/mine --shard-bytes 256M --val-fraction 0.1",
    "eqv2 shard-ase train.extxyz data/mine/train --shard-bytes 256M --energy-key REF_energy "
    "--forces-key REF_forces --stress-key none",
    "eqv2 shard-ase runs.db data/mine --shard-samples 10000 --val-fraction 0.05 --system-key system_id",
]


def main(argv: list[str] | None = None) -> int:
    p = parser("shard-ase", __doc__, EXAMPLES)
    p.add_argument("inputs", nargs="+", help="ASE-readable files and/or directories holding them")
    p.add_argument("out", help="output directory (with --val-fraction: OUT/train and OUT/val)")
    p.add_argument("--energy-key", default="calc", help="'calc' (the calculator results) or an info key")
    p.add_argument("--forces-key", default="calc", help="'calc' or an arrays key")
    p.add_argument("--stress-key", default="calc", help="'calc' (when present), an info key, or 'none'")
    p.add_argument("--system-key", default=None, help="info key naming each frame's system (default: its file)")
    p.add_argument("--tags", action="store_true", help="read arrays['tags'] as OC20 tags (0 sub, 1 surf, 2 ads)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of systems (or structures) for OUT/val")
    p.add_argument("--split-by", choices=["system", "structure"], default="system")
    p.add_argument("--split-seed", type=int, default=0)
    add_sharding_arguments(p)
    args = p.parse_args(argv)
    if not 0.0 <= args.val_fraction < 1.0:
        p.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    try:
        sources, root = find_ase_inputs(args.inputs)
    except FileNotFoundError as err:
        return fail("shard-ase", str(err))
    keys = AseKeys(args.energy_key, args.forces_key, None if args.stress_key == "none" else args.stress_key,
                   args.system_key, args.tags)
    origin = "ase:" + ",".join(str(Path(i).resolve()) for i in args.inputs)
    sides = ["train", "val"] if args.val_fraction > 0 else ["all"]
    for side in sides:
        split = Split(side, args.val_fraction, args.split_by, args.split_seed)
        out = args.out if side == "all" else str(Path(args.out) / side)
        read = functools.partial(read_ase, root=str(root), keys=keys, split=split)
        code = run_sharding_cli(p, argparse.Namespace(**{**vars(args), "out": out}), lambda: sources, read, "total",
                                origin + (f" ({side} side of {args.val_fraction:g} by {args.split_by})"
                                          if side != "all" else ""))
        if code:
            return code
    return 0
