#!/usr/bin/env python
"""Synthetic OC20-sized shards for GPU benchmarks of the trainer (not for accuracy claims).

OC20 S2EF structures average ~78 atoms with up to 20 neighbours inside 12 Å; the demo data
(eqv2 demo-data) has ~26.  This builds adsorbate+slab systems of OC20 size (fcc(111) slabs of
48-80 metal atoms, 10 Å vacuum, a small adsorbate, rattled), labels them with ASE's EMT potential
(real energies and forces, if simple physics), fixes the bottom two layers as OC20 does, and shards
them with the data pipeline's own writer, so the trainer reads them exactly like converted OC20.

    python -m bench.make_oc20_sized_data --out /tmp/oc20_sized --train 4000 --val 200 --workers 16
    python -m bench.make_oc20_sized_data --out /tmp/oc20_x8 --train 24000 --val 200 --shards 128 --workers 64
"""
from __future__ import annotations

import argparse
import functools
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SLAB_SIZES = [(4, 4, 4), (4, 4, 5), (5, 4, 4), (3, 4, 6), (4, 5, 4), (3, 3, 6), (4, 4, 3)]  # 48..80 atoms, mean 68
METALS = ["Cu", "Pt", "Ag", "Ni", "Pd", "Au", "Al"]  # EMT covers these and H, C, N, O
ADSORBATES = ["CO", "OH", "H2O", "NH3", "CH3", "CH4", "O", "H", "N", "C"]


def _structure(seed: int, sid: int) -> dict:
    from ase import Atoms
    from ase.build import add_adsorbate, fcc111, molecule
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    size = SLAB_SIZES[rng.integers(len(SLAB_SIZES))]
    slab = fcc111(METALS[rng.integers(len(METALS))], size=size, vacuum=10.0)
    layer = slab.get_tags()  # 1 = top ... size[2] = bottom
    name = ADSORBATES[rng.integers(len(ADSORBATES))]
    ads = Atoms(name) if len(name) <= 2 and name not in ("CO", "OH") else molecule(name)
    add_adsorbate(slab, ads, 2.0 + 0.5 * rng.random(), ["ontop", "fcc", "hcp"][rng.integers(3)])
    n_slab = len(layer)
    tags = np.concatenate([np.where(layer <= size[2] - 2, 1, 0), np.full(len(slab) - n_slab, 2)])
    slab.set_positions(slab.positions + rng.normal(0.0, 0.04, slab.positions.shape) * (tags != 0)[:, None])
    slab.calc = EMT()
    return {"sid": str(sid), "fid": "0", "positions": slab.get_positions(), "numbers": slab.numbers.copy(),
            "cell": np.asarray(slab.cell), "pbc": slab.pbc.copy(), "tags": tags, "fixed": tags == 0,
            "forces": slab.get_forces(), "total_energy": slab.get_potential_energy(), "ref_energy": 0.0}


def main(argv: list[str] | None = None) -> int:
    from eqv2.data.extxyz import find_inputs, read_source
    from eqv2.data.sharding import shard_sources
    from eqv2.data.validate import LabelBounds
    from eqv2.tools.demo_data import write_raw

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=4000, help="training structures")
    p.add_argument("--val", type=int, default=200, help="validation structures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--shards", type=int, default=16,
                   help="about this many training shards (at least ranks x data.num_workers for a multi-GPU run)")
    args = p.parse_args(argv)
    t0 = time.time()
    out = Path(args.out)
    with Pool(args.workers) as pool:
        for split, count, base in (("train", args.train, 0), ("val", args.val, 10**7)):
            frames = pool.starmap(_structure, [(args.seed * 10**8 + base + i, base + i) for i in range(count)])
            write_raw([[f] for f in frames], out / "raw" / split, split, per_file=100, xz=False)
            m = shard_sources([str(f) for f in find_inputs(out / "raw" / split)], functools.partial(read_source, True),
                              out / split, split, max(1, min(250, count // args.shards)), 0, args.workers, 20, "total_minus_ref",
                              f"make_oc20_sized_data seed={args.seed}", progress=False,
                              # EMT on the rattled slabs gives some forces above the default bound of 100
                              # eV/Å; these structures are benchmark inputs, not physics
                              bounds=LabelBounds(max_force=1e4))
            print(f"{out / split}: {len(m.shards)} shards, {m.num_samples} samples, {m.num_atoms} atoms")
    print(f"built in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
