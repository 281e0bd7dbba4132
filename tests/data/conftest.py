"""Fixtures: small OC20-layout datasets derived from the real OC20 structure in tests/assets."""
from __future__ import annotations

import functools
from pathlib import Path

import ase.io
import numpy as np
import pytest

from eqv2.data.extxyz import format_frame, read_source
from eqv2.data.format import encode_sample, sample_key
from eqv2.data.sharding import shard_sources
from eqv2.data.stats import summarize
from eqv2.data.writer import ShardWriter
from tests.conftest import OC20_JSON as OC20


def oc20_frames(n: int, seed: int, sid0: int = 2181546) -> list[dict]:
    """Variants of the real OC20 adslab: rattled, some atoms removed (varying size), new E/F."""
    atoms = ase.io.read(OC20)
    rng = np.random.default_rng(seed)
    fixed0 = np.zeros(len(atoms), bool)
    fixed0[atoms.constraints[0].get_indices()] = True
    frames = []
    for k in range(n):
        keep = np.ones(len(atoms), bool)
        keep[rng.choice(np.arange(2, len(atoms)), size=int(rng.integers(0, 12)), replace=False)] = False
        total = float(atoms.get_potential_energy()) + float(rng.normal(0, 2))
        frames.append({
            "sid": str(sid0 + k // 3), "fid": str(k % 3),
            "positions": atoms.positions[keep] + rng.normal(0, 0.05, (keep.sum(), 3)),
            "numbers": atoms.numbers[keep], "cell": np.asarray(atoms.cell), "pbc": np.array([True, True, True]),
            "tags": atoms.get_tags()[keep], "fixed": fixed0[keep],
            "forces": atoms.get_forces(apply_constraint=False)[keep] + rng.normal(0, 0.1, (keep.sum(), 3)),
            "total_energy": total, "ref_energy": float(rng.normal(-50, 5)),
        })
    return frames


def write_raw(raw_dir: Path, frames: list[dict], per_file: int) -> None:
    raw_dir.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(frames), per_file):
        chunk = frames[i : i + per_file]
        (raw_dir / f"data_{i // per_file:03d}.extxyz").write_text("".join(format_frame(f) for f in chunk))
        (raw_dir / f"data_{i // per_file:03d}.txt").write_text(
            "".join(f"random{f['sid']},frame{f['fid']},{f['ref_energy']!r}\n" for f in chunk))


def shard_raw(raw_dir: Path, out: Path, shard_samples: int, workers: int = 1, subtract: bool = True):
    from eqv2.data.extxyz import find_inputs

    return shard_sources([str(f) for f in find_inputs(raw_dir)], functools.partial(read_source, subtract), out,
                         "shard", shard_samples, 0, workers, 4, "total_minus_ref" if subtract else "total",
                         "test", progress=False)


def write_uneven(out: Path, samples: list[dict], sizes: list[int], payloads: dict | None = None):
    """Shards with exactly the given sample counts; `payloads` can replace a key's bytes (bad input)."""
    assert sum(sizes) == len(samples)
    writer = ShardWriter(out, "shard", max_samples=sizes[0])
    i = 0
    for size in sizes:
        writer.max_samples = size
        for _ in range(size):
            s = samples[i]
            key = sample_key(s["sid"], s["fid"])
            payload = (payloads or {}).get(key) or encode_sample(s)
            writer.add(key, payload, summarize(s, key, 0), [0, i + 1])
            i += 1
        writer._close_shard()
    return writer.finish("total", "test")


def with_energy(frames: list[dict]) -> list[dict]:
    return [dict(f, energy=f["total_energy"] - f["ref_energy"]) for f in frames]


@pytest.fixture(scope="session")
def frames() -> list[dict]:
    return oc20_frames(60, seed=1)


@pytest.fixture(scope="session")
def uneven_dir(tmp_path_factory, frames) -> Path:
    """10 shards of very different sizes (1..14 samples), 60 structures of 23-34 atoms."""
    out = tmp_path_factory.mktemp("uneven")
    write_uneven(out, with_energy(frames), [14, 1, 9, 3, 2, 11, 5, 7, 6, 2])
    return out
