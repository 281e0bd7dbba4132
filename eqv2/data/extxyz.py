"""OC20's raw S2EF download layout: `*.extxyz[.xz]` frames, each file beside a `*.txt`.

Every frame of `<name>.extxyz` (or `<name>.extxyz.xz`) has a comment line like
`Lattice="..." Properties=species:S:1:pos:R:3:move_mask:L:1:tags:I:1:forces:R:3 energy=...
free_energy=... pbc="T T T"`; line k of `<name>.txt` is `random<sid>,frame<fid>,<reference_energy>`
for frame k.  The reader parses frames with numpy (ASE's key=value parser for the comment line
only), which is several times faster than building `ase.Atoms` objects.  `move_mask` True means the
atom may move, so `fixed = ~move_mask`.
"""
from __future__ import annotations

import lzma
import re
from pathlib import Path
from typing import Iterator

import numpy as np
from ase.data import atomic_numbers as _Z
from ase.io.extxyz import key_val_str_to_dict

from eqv2.data.format import SampleError, check_sample

_ID = re.compile(r"^[A-Za-z_-]*?(\d+)$")


def find_inputs(root: str | Path) -> list[Path]:
    """Sorted `*.extxyz` / `*.extxyz.xz` files under `root` (the deterministic processing order)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"input directory not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.name.endswith((".extxyz", ".extxyz.xz")))
    if not files:
        raise FileNotFoundError(f"{root}: no *.extxyz or *.extxyz.xz files")
    return files


def txt_for(path: Path) -> Path:
    stem = path.name[: -len(".extxyz.xz")] if path.name.endswith(".xz") else path.name[: -len(".extxyz")]
    for candidate in (path.with_name(stem + ".txt"), path.with_name(stem + ".txt.xz")):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{path}: the matching {stem}.txt with random<sid>,frame<fid>,<ref_energy> lines is missing")


def _open_text(path: Path):
    return lzma.open(path, "rt") if path.name.endswith(".xz") else open(path)


def _clean_id(text: str, where: str) -> str:
    """`random2181546` -> `2181546`; ids may not contain `.` or `/` (they become tar member keys)."""
    text = text.strip()
    m = _ID.match(text)
    if m:
        return m.group(1)
    if not text or any(c in text for c in "./ _"):
        raise SampleError(f"{where}: unusable id {text!r}")
    return text


def read_ids(path: Path) -> list[tuple[str, str, float | None]]:
    out = []
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.strip().split(",")
            if len(parts) < 2:
                raise SampleError(f"{path}:{lineno}: expected random<sid>,frame<fid>,<ref_energy>, got {line.strip()!r}")
            where = f"{path}:{lineno}"
            ref = float(parts[2]) if len(parts) > 2 and parts[2].strip() else None
            out.append((_clean_id(parts[0], where), _clean_id(parts[1], where), ref))
    return out


def _columns(spec: str, where: str) -> dict[str, tuple[int, int, str]]:
    fields = spec.split(":")
    if len(fields) % 3:
        raise SampleError(f"{where}: malformed Properties={spec}")
    cols, start = {}, 0
    for i in range(0, len(fields), 3):
        name, kind, width = fields[i], fields[i + 1], int(fields[i + 2])
        cols[name] = (start, start + width, kind)
        start += width
    return cols


def read_frames(path: Path, subtract_reference: bool) -> Iterator[dict]:
    """Samples of one extxyz file in file order (see `eqv2.data.format` for the fields)."""
    ids = read_ids(txt_for(path))
    with _open_text(path) as fh:
        frame = 0
        while True:
            head = fh.readline()
            if not head.strip():
                break
            where = f"{path} frame {frame}"
            if frame >= len(ids):
                raise SampleError(f"{where}: more frames than lines in {txt_for(path).name} ({len(ids)})")
            natoms = int(head)
            info = key_val_str_to_dict(fh.readline())
            rows = [fh.readline().split() for _ in range(natoms)]
            if len(rows[-1]) == 0:
                raise SampleError(f"{where}: file ends inside the frame")
            cols = _columns(info.get("Properties", "species:S:1:pos:R:3"), where)
            table = np.array(rows, dtype=object)
            get = lambda name: table[:, cols[name][0] : cols[name][1]] if name in cols else None
            sid, fid, ref = ids[frame]
            total = info.get("energy")
            sample = {
                "sid": sid,
                "fid": fid,
                "positions": get("pos").astype(np.float64).astype(np.float32),
                "numbers": np.array([_Z[s] for s in get("species")[:, 0]], dtype=np.uint8),
                # ASE returns Lattice column-major (vectors as columns); cells here have vectors as rows
                "cell": np.asarray(info["Lattice"], dtype=np.float64).reshape(3, 3).T.astype(np.float32),
                "pbc": np.asarray(info.get("pbc", [True, True, True]), dtype=bool),
                "tags": get("tags")[:, 0].astype(np.int64).astype(np.int8) if "tags" in cols else None,
                "fixed": ~(get("move_mask")[:, 0] == "T") if "move_mask" in cols else None,
                "forces": get("forces").astype(np.float64).astype(np.float32) if "forces" in cols else None,
                "total_energy": float(total) if total is not None else None,
                "ref_energy": ref,
            }
            if subtract_reference and total is not None and ref is None:
                raise SampleError(f"{where}: reference energy missing in {txt_for(path).name} but subtraction requested")
            if total is not None:
                sample["energy"] = float(total) - ref if subtract_reference else float(total)
            check_sample(sample, where)
            yield sample
            frame += 1
        if frame != len(ids):
            raise SampleError(f"{path}: {frame} frames but {len(ids)} lines in {txt_for(path).name}")


def format_frame(sample: dict) -> str:
    """One frame in OC20's extxyz layout (used by the demo generator and tests)."""
    cell = " ".join(f"{v:.8f}" for v in np.asarray(sample["cell"], dtype=np.float64).reshape(-1))
    pbc = " ".join("T" if p else "F" for p in sample["pbc"])
    e = sample["total_energy"]
    lines = [
        str(len(sample["numbers"])),
        f'Lattice="{cell}" Properties=species:S:1:pos:R:3:move_mask:L:1:tags:I:1:forces:R:3 '
        f'energy={e:.8f} free_energy={e:.8f} pbc="{pbc}"',
    ]
    from ase.data import chemical_symbols

    for z, p, fx, t, f in zip(sample["numbers"], sample["positions"], sample["fixed"], sample["tags"], sample["forces"]):
        lines.append(
            f"{chemical_symbols[int(z)]:<2s} {p[0]:.8f} {p[1]:.8f} {p[2]:.8f} {'F' if fx else 'T'} {int(t)} "
            f"{f[0]:.8f} {f[1]:.8f} {f[2]:.8f}"
        )
    return "\n".join(lines) + "\n"


def read_source(subtract_reference: bool, source: str) -> Iterator[dict]:
    """`read_frames` with picklable arguments, for the sharding process pool."""
    return read_frames(Path(source), subtract_reference)
