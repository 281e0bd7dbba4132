"""Shard manifest: what a reader needs to plan an epoch without opening a shard.

`manifest.json` lists every shard in write order with its sample count, total and largest atom
count, size, sha256 and the partial sums of `eqv2.data.stats`.  Readers plan rank/worker
assignment and batch counts from it, and verify each shard's checksum against it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_FORMAT = "eqv2-shards-1"


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name, e.g. "train-000012.tar"
    count: int  # samples
    atoms: int  # total atoms
    max_natoms: int  # largest structure
    bytes: int
    sha256: str
    sums: dict = field(default_factory=dict, compare=False, hash=False)  # eqv2.data.stats.Accumulator


@dataclass
class Manifest:
    shards: list[ShardInfo]
    energy_target: str  # "total" or "total_minus_ref"
    source: str = ""  # what was sharded (informational)
    path: Path | None = None
    skipped_frames: int = 0  # bad input frames left out by `--on-error skip` when sharding

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def num_atoms(self) -> int:
        return sum(s.atoms for s in self.shards)

    @property
    def max_natoms(self) -> int:
        return max((s.max_natoms for s in self.shards), default=0)

    def to_json(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "energy_target": self.energy_target,
            "source": self.source,
            "num_samples": self.num_samples,
            "num_atoms": self.num_atoms,
            "skipped_frames": self.skipped_frames,
            "shards": [
                {"name": s.name, "count": s.count, "atoms": s.atoms, "max_natoms": s.max_natoms,
                 "bytes": s.bytes, "sha256": s.sha256, "sums": s.sums}
                for s in self.shards
            ],
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard manifest not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON: {err}") from err
    if data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    shards = []
    for i, s in enumerate(data["shards"]):
        try:
            shards.append(ShardInfo(s["name"], int(s["count"]), int(s["atoms"]), int(s["max_natoms"]),
                                    int(s["bytes"]), str(s["sha256"]), dict(s.get("sums", {}))))
        except KeyError as err:
            raise ValueError(f"{path}: shard entry {i} lacks {err}") from err
    if len({s.name for s in shards}) != len(shards):
        raise ValueError(f"{path}: duplicate shard names")
    return Manifest(shards, data.get("energy_target", "total"), data.get("source", ""), path,
                    int(data.get("skipped_frames", 0)))
