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
from ase.io.extxyz import key_val_str_to_dict

from eqv2.data.format import SampleError
from eqv2.data.validate import atomic_numbers

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


def read_frames(path: Path, subtract_reference: bool) -> Iterator[tuple[str, dict | SampleError]]:
    """(where, sample) for each frame of one extxyz file in file order (fields: `eqv2.data.format`).

    A frame that is malformed but whose extent is known (no atoms, an unknown element, an unparsable
    line, a file ending inside it) comes as (where, SampleError) so the caller can raise or skip it;
    a file whose frames cannot be delimited any more (a count line that is not a number, more frames
    than id lines) raises SampleError.  `where` is "<file> frame <k>".
    """
    txt = txt_for(path)
    ids = read_ids(txt)
    with _open_text(path) as fh:
        frame = 0
        while True:
            head = fh.readline()
            if not head.strip():
                if head and fh.read().strip():  # a blank line between frames: nothing may follow it
                    raise SampleError(f"{path} frame {frame}: blank line where an atom count was expected")
                break
            where = f"{path} frame {frame}"
            if frame >= len(ids):
                raise SampleError(f"{where}: more frames than lines in {txt.name} ({len(ids)})")
            try:
                natoms = int(head)
            except ValueError:
                raise SampleError(f"{where}: first line {head.strip()[:40]!r} is not an atom count "
                                  f"(the frames after it cannot be found)") from None
            if natoms < 0:
                raise SampleError(f"{where}: negative atom count {natoms}")
            comment = fh.readline()
            rows = [fh.readline() for _ in range(natoms)]
            if not comment or (rows and not rows[-1].endswith("\n") and not rows[-1].strip()):
                got = sum(1 for r in rows if r.strip())
                yield where, SampleError(f"{where}: file ends inside the frame ({got} of {natoms} atom lines"
                                         f"{_lost(len(ids) - frame - 1, txt)})")
                return
            try:
                yield where, _parse_frame(comment, rows, ids[frame], txt, subtract_reference, where)
            except _Truncated as err:
                yield where, SampleError(f"{str(err)[:-1]}{_lost(len(ids) - frame - 1, txt)})")
                return
            except SampleError as err:
                yield where, err
            frame += 1
        if frame != len(ids):
            raise SampleError(f"{path}: {frame} frames but {len(ids)} lines in {txt.name}")


class _Truncated(SampleError):
    """The file ends inside this frame: nothing after it can be read."""


def _lost(after: int, txt: Path) -> str:
    return f"; {txt.name} lists {after} more frames after it" if after > 0 else ""


def _parse_frame(comment: str, rows: list[str], ids: tuple[str, str, float | None], txt: Path,
                 subtract_reference: bool, where: str) -> dict:
    if not rows:
        raise SampleError(f"{where}: no atoms (atom count 0)")
    try:
        info = key_val_str_to_dict(comment)
    except Exception as err:  # noqa: BLE001 - ASE's parser raises several types for a malformed line
        raise SampleError(f"{where}: cannot parse the comment line: {err}") from None
    cols = _columns(info.get("Properties", "species:S:1:pos:R:3"), where)
    width = max(stop for _, stop, _ in cols.values())
    split = [r.split() for r in rows]
    for k, fields in enumerate(split):
        if len(fields) != width:
            if not rows[k].endswith("\n"):
                raise _Truncated(f"{where}: file ends inside the frame (atom line {k} of {len(rows)} is cut)")
            raise SampleError(f"{where}: atom line {k} has {len(fields)} columns, Properties gives {width}")
    if "Lattice" not in info:
        raise SampleError(f"{where}: no Lattice= in the comment line")
    table = np.array(split, dtype=object)
    get = lambda name: table[:, cols[name][0] : cols[name][1]] if name in cols else None
    sid, fid, ref = ids
    total = info.get("energy")
    try:
        sample = {
            "sid": sid,
            "fid": fid,
            "positions": get("pos").astype(np.float64).astype(np.float32),
            "numbers": atomic_numbers(get("species")[:, 0].tolist(), where),
            # ASE returns Lattice column-major (vectors as columns); cells here have vectors as rows
            "cell": np.asarray(info["Lattice"], dtype=np.float64).reshape(3, 3).T.astype(np.float32),
            "pbc": np.asarray(info.get("pbc", [True, True, True]), dtype=bool),
            "tags": get("tags")[:, 0].astype(np.int64).astype(np.int8) if "tags" in cols else None,
            "fixed": ~(get("move_mask")[:, 0] == "T") if "move_mask" in cols else None,
            "forces": get("forces").astype(np.float64).astype(np.float32) if "forces" in cols else None,
            "total_energy": float(total) if total is not None else None,
            "ref_energy": ref,
        }
    except SampleError:
        raise
    except (ValueError, TypeError) as err:
        raise SampleError(f"{where}: unreadable value: {err}") from None
    if subtract_reference and total is not None and ref is None:
        raise SampleError(f"{where}: reference energy missing in {txt.name} but subtraction requested")
    if total is not None:
        sample["energy"] = float(total) - ref if subtract_reference else float(total)
    return sample


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


def read_source(subtract_reference: bool, source: str) -> Iterator[tuple[str, dict | SampleError]]:
    """`read_frames` with picklable arguments, for the sharding process pool."""
    return read_frames(Path(source), subtract_reference)
