"""One structure as bytes: the sample format inside every shard.

A shard is a tar file with one member per structure, named `<sid>_<fid>.safetensors` (WebDataset key
`<sid>_<fid>`, extension `safetensors`).  The member uses the safetensors layout -- an 8-byte
little-endian header length, a JSON header, raw little-endian arrays -- because it holds typed arrays
with no pickle anywhere and decodes with a few `np.frombuffer` calls (one tar member per sample is
~10x faster to read than one `.npy` member per array).  Any safetensors reader can open a member.

Arrays (N atoms):
    positions     F32 [N, 3]  Å                 numbers   U8  [N]   atomic numbers
    cell          F32 [3, 3]  rows = lattice    pbc       BOOL [3]
    tags          I8  [N]     0 sub, 1 surf, 2 ads (optional)
    fixed         BOOL [N]    True = held fixed (optional)
    forces        F32 [N, 3]  eV/Å (optional)
    energy        F64 []      training target, eV (optional): total_energy, or total - ref
    total_energy  F64 []      DFT total energy (optional)
    ref_energy    F64 []      OC20 reference energy (optional, only when known)
    stress        F32 [3, 3]  eV/Å³, ASE's sign convention (optional; from ASE datasets that have it)
Header metadata: {"format": "eqv2-sample-1", "sid": str, "fid": str}.
"""
from __future__ import annotations

import json
import struct

import numpy as np

FORMAT = "eqv2-sample-1"
EXTENSION = "safetensors"

# name -> (numpy dtype, safetensors dtype, trailing shape (None = per-atom leading dim), required)
_FIELDS: dict[str, tuple[np.dtype, str, tuple[int, ...] | None, bool]] = {
    "positions": (np.dtype("<f4"), "F32", (3,), True),
    "numbers": (np.dtype("u1"), "U8", (), True),
    "cell": (np.dtype("<f4"), "F32", None, True),
    "pbc": (np.dtype("?"), "BOOL", None, True),
    "tags": (np.dtype("i1"), "I8", (), False),
    "fixed": (np.dtype("?"), "BOOL", (), False),
    "forces": (np.dtype("<f4"), "F32", (3,), False),
    "energy": (np.dtype("<f8"), "F64", None, False),
    "total_energy": (np.dtype("<f8"), "F64", None, False),
    "ref_energy": (np.dtype("<f8"), "F64", None, False),
    "stress": (np.dtype("<f4"), "F32", None, False),
}
_FIXED_SHAPES = {"cell": (3, 3), "pbc": (3,), "energy": (), "total_energy": (), "ref_energy": (), "stress": (3, 3)}
_DTYPES = {code: dt for dt, code, _, _ in _FIELDS.values()}


class SampleError(ValueError):
    """A sample is malformed; the message names the shard (or file) and the sample key."""


def sample_key(sid: str | int, fid: str | int) -> str:
    return f"{sid}_{fid}"


def check_sample(sample: dict, where: str) -> int:
    """Validate fields, dtypes-compatibility, shapes and finiteness; return the atom count."""
    for name, (_, _, _, required) in _FIELDS.items():
        if required and sample.get(name) is None:
            raise SampleError(f"{where}: missing field '{name}'")
    unknown = set(sample) - set(_FIELDS) - {"sid", "fid"}
    if unknown:
        raise SampleError(f"{where}: unknown field(s) {sorted(unknown)}")
    n = int(np.shape(sample["numbers"])[0]) if np.ndim(sample["numbers"]) == 1 else -1
    if n == 0:
        raise SampleError(f"{where}: no atoms (an empty structure)")
    if n < 1:
        raise SampleError(f"{where}: 'numbers' must be a non-empty 1-d array, got shape {np.shape(sample['numbers'])}")
    for name, (_, _, per_atom, _) in _FIELDS.items():
        value = sample.get(name)
        if value is None:
            continue
        shape = tuple(np.shape(value))
        want = (n, *per_atom) if per_atom is not None else _FIXED_SHAPES[name]
        if shape != want:
            raise SampleError(f"{where}: field '{name}' has shape {shape}, expected {want}")
        arr = np.asarray(value)
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise SampleError(f"{where}: field '{name}' contains NaN or inf")
    z = np.asarray(sample["numbers"])
    if z.min() < 1 or z.max() > 118:
        raise SampleError(f"{where}: atomic numbers outside 1..118 (min {z.min()}, max {z.max()})")
    if sample.get("tags") is not None:
        tags = np.asarray(sample["tags"])
        if tags.min() < 0 or tags.max() > 2:
            raise SampleError(f"{where}: tags outside 0..2")
    return n


def encode_sample(sample: dict) -> bytes:
    """Bytes of one sample (see module docstring); `sample` must carry `sid` and `fid`."""
    where = f"sample {sample.get('sid')}_{sample.get('fid')}"
    check_sample(sample, where)
    header: dict = {}
    blobs: list[bytes] = []
    offset = 0
    for name, (dtype, code, _, _) in _FIELDS.items():
        value = sample.get(name)
        if value is None:
            continue
        arr = np.asarray(value).astype(dtype, copy=False)  # tobytes() writes C order; keeps 0-d shape
        blob = arr.tobytes()
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = {"format": FORMAT, "sid": str(sample["sid"]), "fid": str(sample["fid"])}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def decode_sample(data: bytes, where: str, check: bool = True) -> dict:
    """Arrays of one sample (read-only views into `data`), plus `sid`, `fid`; raises SampleError."""
    try:
        (hlen,) = struct.unpack_from("<Q", data)
        if hlen > len(data) - 8:
            raise ValueError(f"header length {hlen} exceeds the {len(data)}-byte member")
        header = json.loads(data[8 : 8 + hlen])
        meta = header.pop("__metadata__")
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        base = 8 + hlen
        out: dict = {"sid": meta["sid"], "fid": meta["fid"]}
        for name, info in header.items():
            if name not in _FIELDS:
                raise ValueError(f"unknown field '{name}'")
            dtype = _DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            if base + end > len(data) or end < begin:
                raise ValueError(f"field '{name}' lies outside the member (truncated?)")
            count = (end - begin) // dtype.itemsize
            if count != int(np.prod(info["shape"], dtype=np.int64)):
                raise ValueError(f"field '{name}': {count} values for shape {info['shape']}")
            out[name] = np.frombuffer(data, dtype, count=count, offset=base + begin).reshape(tuple(info["shape"]))
    except (ValueError, KeyError, TypeError, struct.error) as err:
        raise SampleError(f"{where}: cannot decode sample: {err}") from err
    if check:
        check_sample(out, where)
    return out
