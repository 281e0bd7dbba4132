"""Build the embedded demo dataset: EMT adsorbate+slab structures in OC20's raw layout, then shards.

Real (if simple) physics: ASE's EMT potential on fcc(111) slabs of Cu/Al/Ni/Pd/Ag/Pt/Au with
C/N/O/H adsorbates.  Each system contributes short Langevin MD frames and rattled frames; the two
bottom layers are fixed (tag 0), the top layers are surface (tag 1), adsorbate atoms tag 2, as in
OC20.  Reference energy = sum over atoms of per-element reference energies, fitted by least squares
to all frames' total EMT energies (the per-element referencing fairchem applies to total
energies), so the targets are what composition does not explain: binding, strain, thermal motion.
Without it the total energies are dominated by composition and a short run learns little beyond
their mean.  avg_degree is measured on ~1 in 4 structures, on the demo model's graph (6 Å / 12
neighbours, configs/train/demo.yaml).  Frames are written as OC20 raw
files (`*.extxyz` train, `*.extxyz.xz` val, each with its `*.txt`) under OUT/raw and sharded with
the same code as `eqv2 shard` into OUT/train and OUT/val.  Deterministic by --seed.
"""
from __future__ import annotations

import lzma
import time
from pathlib import Path

import numpy as np

from eqv2.tools.common import add_quiet, fail, parser, progress

EXAMPLES = [
    "eqv2 demo-data --out data/demo                          # what `make demo` builds (~15 s)",
    "eqv2 demo-data --out /tmp/tiny --train-systems 3 --val-systems 2 --frames 4",
]

METALS = ["Cu", "Al", "Ni", "Pd", "Ag", "Pt", "Au"]
DEMO_GRAPH = (6.0, 12)  # the demo model's max_radius / max_neighbors (configs/train/demo.yaml)
ADSORBATES = [["O"], ["H"], ["N"], ["C"], ["C", "O"], ["O", "H"], ["N", "H"], ["C", "H"]]


def _system(rng: np.random.Generator, sid: int, frames: int) -> list[dict]:
    from ase import Atoms
    from ase.build import add_adsorbate, fcc111
    from ase.calculators.emt import EMT
    from ase.constraints import FixAtoms
    from ase.md.langevin import Langevin
    from ase import units

    metal = METALS[rng.integers(len(METALS))]
    size = [(2, 2, 4), (3, 2, 4), (3, 3, 3), (2, 3, 5)][rng.integers(4)]
    slab = fcc111(metal, size=size, vacuum=7.0)
    layer = slab.get_tags()  # 1 = top layer ... size[2] = bottom
    calc = EMT()
    ads = ADSORBATES[rng.integers(len(ADSORBATES))]
    mol = Atoms(ads, positions=[[0, 0, 1.2 * i] for i in range(len(ads))])
    add_adsorbate(slab, mol, height=1.6 + 0.4 * rng.random(), position=["ontop", "fcc", "hcp", "bridge"][rng.integers(4)])
    tags = np.concatenate([np.where(layer <= 2, 1, 0), np.full(len(ads), 2)])
    slab.set_tags(tags)
    slab.set_constraint(FixAtoms(mask=tags == 0))
    slab.calc = calc
    out = []

    def record(fid: int) -> None:
        out.append({
            "sid": str(sid), "fid": str(fid), "positions": slab.get_positions(),
            "numbers": slab.numbers.copy(), "cell": np.asarray(slab.cell), "pbc": slab.pbc.copy(),
            "tags": tags.copy(), "fixed": tags == 0, "forces": slab.get_forces(apply_constraint=False),
            "total_energy": slab.get_potential_energy(), "ref_energy": 0.0,  # set by _reference
        })

    dyn = Langevin(slab, 2.0 * units.fs, temperature_K=300 + 600 * rng.random(), friction=0.05, fixcm=False,
                   rng=np.random.RandomState(int(rng.integers(2**31))))
    n_md = frames // 2
    for i in range(n_md):
        dyn.run(3)
        record(3 * (i + 1))
    base = slab.get_positions()
    for j in range(frames - n_md):
        moved = base + rng.normal(0.0, 0.08, base.shape) * (tags != 0)[:, None]
        slab.set_positions(moved, apply_constraint=False)
        record(1000 + j)
    return out


def _reference(systems: list[list[dict]]) -> dict[int, float]:
    """Per-element energies fitted to the frames' total energies (least squares on element counts);
    sets every frame's ref_energy to its atoms' sum.  Returns {Z: eV}."""
    frames = [f for s in systems for f in s]
    elements = sorted({int(z) for f in frames for z in f["numbers"]})
    counts = np.array([[np.count_nonzero(f["numbers"] == z) for z in elements] for f in frames], dtype=float)
    energies = np.array([f["total_energy"] for f in frames])
    refs = dict(zip(elements, np.linalg.lstsq(counts, energies, rcond=None)[0].tolist()))
    for frame in frames:
        frame["ref_energy"] = float(sum(refs[int(z)] for z in frame["numbers"]))
    return refs


def write_raw(systems: list[list[dict]], raw_dir: Path, stem: str, per_file: int, xz: bool) -> None:
    from eqv2.data.extxyz import format_frame

    raw_dir.mkdir(parents=True, exist_ok=True)
    frames = [f for s in systems for f in s]
    for k in range(0, len(frames), per_file):
        chunk = frames[k : k + per_file]
        name = f"{stem}_{k // per_file:03d}"
        text = "".join(format_frame(f) for f in chunk)
        ids = "".join(f"random{f['sid']},frame{f['fid']},{f['ref_energy']:.8f}\n" for f in chunk)
        if xz:
            (raw_dir / f"{name}.extxyz.xz").write_bytes(lzma.compress(text.encode()))
        else:
            (raw_dir / f"{name}.extxyz").write_text(text)
        (raw_dir / f"{name}.txt").write_text(ids)


def main(argv: list[str] | None = None) -> int:
    import functools

    from eqv2.data.extxyz import find_inputs, read_source
    from eqv2.data.format import SampleError
    from eqv2.data.sharding import shard_sources

    p = parser("demo-data", __doc__, EXAMPLES)
    p.add_argument("--out", default="data/demo", help="output directory (default: data/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-systems", type=int, default=40, help="adsorbate+slab systems for training")
    p.add_argument("--val-systems", type=int, default=8)
    p.add_argument("--frames", type=int, default=10, help="frames per system (half MD, half rattled)")
    p.add_argument("--workers", type=int, default=2)
    add_quiet(p)
    args = p.parse_args(argv)
    if args.train_systems < 1 or args.val_systems < 1 or args.frames < 1 or args.workers < 1:
        p.error("--train-systems, --val-systems, --workers and --frames must be >= 1")
    t0 = time.time()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return fail("demo-data", f"--out {out}: exists and is not a directory")
    rng = np.random.default_rng(args.seed)
    systems = range(args.train_systems + args.val_systems)
    built = [_system(rng, (100000 + i) if i < args.train_systems else (900000 + i - args.train_systems), args.frames)
             for i in progress(systems, args.quiet, unit="system", desc="EMT frames")]
    train, val = built[: args.train_systems], built[args.train_systems :]
    # one reference per element (about ten numbers) from all frames, so that small --train-systems
    # sets, which may lack an element of the validation set, still work
    _reference(train + val)
    raw = out / "raw"
    try:
        write_raw(train, raw / "train", "train", per_file=50, xz=False)
        write_raw(val, raw / "val", "val", per_file=40, xz=True)
        for split, shard_samples in (("train", 25), ("val", 10)):
            m = shard_sources([str(f) for f in find_inputs(raw / split)], functools.partial(read_source, True),
                              out / split, split, shard_samples, 0, args.workers, 4, "total_minus_ref",
                              f"make_demo_data seed={args.seed}", progress=not args.quiet,
                              degree_graph=DEMO_GRAPH)
            print(f"{out / split}: {len(m.shards)} shards, {m.num_samples} samples, {m.num_atoms} atoms")
    except OSError as err:  # an unwritable --out
        return fail("demo-data", f"--out {out}: cannot write {err.filename or ''} ({err.strerror or err})")
    except SampleError as err:  # --out holds other shards (a resumed run of other settings)
        return fail("demo-data", f"--out {out}: {err}")
    print(f"demo data built in {time.time() - t0:.1f} s; train on it: "
          "deepspeed eqv2/train.py --ds_config cpu_demo --config demo")
    return 0

