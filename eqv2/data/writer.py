"""Deterministic, resumable shard writing.

Shards are plain tar files whose headers carry no time, owner or permission information
(mtime 0, uid/gid 0, mode 0644, GNU format), so the same samples in the same order always produce
byte-identical shards.  A shard is written to `<name>.tmp`, hashed, then renamed; only then is a
line appended to the journal `<prefix>.progress.jsonl` with the shard's manifest entry and the
writer's *source position* after its last sample.  A killed run restarts from the journal:
shards it lists (whose sha256 still matches) are kept, everything after them is rewritten from the
recorded source position.  The caller supplies that position (e.g. input file index and frame).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

from eqv2.data.format import EXTENSION
from eqv2.data.manifest import Manifest, ShardInfo
from eqv2.data.stats import Accumulator, Summary


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tar_member_size(payload_len: int) -> int:
    return 512 + (payload_len + 511) // 512 * 512


class ShardWriter:
    """Append samples; shards roll over by sample count and/or byte size.

    `max_samples` / `max_bytes` (0 = unlimited, at least one must be set) bound each shard;
    `max_bytes` counts tar member bytes, so files end up at most that size plus 11 KiB (tar end blocks and record padding).
    """

    def __init__(self, out_dir: str | Path, prefix: str, max_samples: int = 0, max_bytes: int = 0) -> None:
        if max_samples <= 0 and max_bytes <= 0:
            raise ValueError("set a shard size: max_samples and/or max_bytes")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.journal = self.out_dir / "progress.jsonl"
        self.shards: list[ShardInfo] = []
        self.position = None  # source position after the last completed shard
        self.skipped = 0  # bad frames the caller skipped before `position`
        self._tar: tarfile.TarFile | None = None
        self._fh = None
        self._count = 0
        self._bytes = 0
        self._acc = Accumulator()
        self._pending_position, self._pending_skipped = None, 0
        self._resume()

    def _name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def _resume(self) -> None:
        """Keep journalled shards whose file and checksum are intact; drop the rest."""
        if not self.journal.exists():
            return
        kept = []
        for line in self.journal.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a kill
            info = ShardInfo(**rec["shard"])
            path = self.out_dir / info.name
            if info.name != self._name(len(kept)) or not path.exists() or sha256_file(path) != info.sha256:
                break
            kept.append((info, rec["position"], int(rec.get("skipped", 0))))
        self.shards = [info for info, _, _ in kept]
        self.position = kept[-1][1] if kept else None
        self.skipped = kept[-1][2] if kept else 0
        self.journal.write_text("".join(json.dumps({"shard": vars(i), "position": p, "skipped": s}) + "\n"
                                        for i, p, s in kept))

    def add(self, key: str, payload: bytes, summary: Summary, position, skipped: int = 0) -> None:
        """Append one sample; `position` is the source position just after it, `skipped` the number of bad
        frames the caller left out before it (journalled, so a resumed run keeps the count)."""
        size = tar_member_size(len(payload))
        full = (self.max_samples and self._count >= self.max_samples) or (
            self.max_bytes and self._count > 0 and self._bytes + size > self.max_bytes
        )
        if self._tar is not None and full:
            self._close_shard()
        if self._tar is None:
            path = self.out_dir / (self._name(len(self.shards)) + ".tmp")
            self._fh = open(path, "wb")
            self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.GNU_FORMAT)
        info = tarfile.TarInfo(f"{key}.{EXTENSION}")
        info.size = len(payload)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(payload))
        self._count += 1
        self._bytes += size
        self._acc.add(summary)
        self._pending_position = position
        self._pending_skipped = skipped

    def _close_shard(self) -> None:
        assert self._tar is not None and self._fh is not None
        self._tar.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        name = self._name(len(self.shards))
        tmp = self.out_dir / (name + ".tmp")
        info = ShardInfo(name, self._count, self._acc.atoms, self._acc.max_natoms, tmp.stat().st_size,
                         sha256_file(tmp), self._acc.to_json())
        tmp.replace(self.out_dir / name)
        with open(self.journal, "a") as jf:
            jf.write(json.dumps({"shard": vars(info), "position": self._pending_position,
                                 "skipped": self._pending_skipped}) + "\n")
            jf.flush()
            os.fsync(jf.fileno())
        self.shards.append(info)
        self.position, self.skipped = self._pending_position, self._pending_skipped
        self._tar, self._fh, self._count, self._bytes, self._acc = None, None, 0, 0, Accumulator()

    def finish(self, energy_target: str, source: str, skipped_frames: int = 0) -> Manifest:
        """Close the last shard, remove stale files of an older longer run, write the manifest."""
        if self._tar is not None:
            self._close_shard()
        names = {s.name for s in self.shards}
        for stale in self.out_dir.glob(f"{self.prefix}-*.tar*"):
            if stale.name not in names:
                stale.unlink()
        manifest = Manifest(list(self.shards), energy_target, source, skipped_frames=skipped_frames)
        manifest.save(self.out_dir / "manifest.json")
        return manifest
