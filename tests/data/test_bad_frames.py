"""Bad input frames given to the sharding tools (run as a user runs them): one line naming file, frame
and problem with exit status 2, or with --on-error skip left out and counted in the manifest."""
from __future__ import annotations

import copy
import json
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from torch_geometric.data import Data

from eqv2.data.extxyz import format_frame
from eqv2.data.lmdb_source import write_lmdb

from tests.verbs import run_eqv2

from .conftest import oc20_frames, with_energy, write_raw

PER_FILE = 6


def _tool(name: str, *args) -> subprocess.CompletedProcess:
    return run_eqv2(name, *args, "--shard-samples", "4", "--quiet")


@pytest.fixture(scope="module")
def frames() -> list[dict]:
    return oc20_frames(PER_FILE, seed=5)


def _edit(frames: list[dict], k: int, **fields) -> list[dict]:
    out = copy.deepcopy(frames)
    out[k].update(fields)
    return out


def _moved(frames, k, i, j, offset):
    pos = np.array(frames[k]["positions"])
    pos[j] = pos[i] + offset(np.asarray(frames[k]["cell"]))
    return _edit(frames, k, positions=pos)


def _text(frames: list[dict]) -> list[str]:
    return [format_frame(f) for f in frames]


def _no_forces(text: str) -> str:
    lines = text.splitlines()
    lines[1] = lines[1].replace(":forces:R:3", "")
    return "\n".join(lines[:2] + [" ".join(row.split()[:6]) for row in lines[2:]]) + "\n"


def _unknown_symbol(text: str, atom: int) -> str:
    lines = text.splitlines(keepends=True)
    lines[2 + atom] = "Xx" + lines[2 + atom][2:]
    return "".join(lines)


# name -> (frames -> list of frame texts (joined into data_000.extxyz), bad frame, expected problem)
CASES = {
    "zero_atoms": (lambda f: _text(f)[:2] + ['0\nLattice="9 0 0 0 9 0 0 0 9" Properties=species:S:1:pos:R:3 '
                                               'energy=-1.0 pbc="T T T"\n'] + _text(f)[3:], 2,
                   r"no atoms \(atom count 0\)"),
    "unknown_element": (lambda f: [t if k != 3 else _unknown_symbol(t, 4) for k, t in enumerate(_text(f))], 3,
                        r"unknown element symbol 'Xx' \(atom 4\)"),
    "truncated_mid_line": (lambda f: ["".join(_text(f))[:-40]], 5, r"file ends inside the frame \(atom line \d+ of \d+ is cut\)"),
    "truncated_at_line": (lambda f: ["".join(_text(f)[:4]) + "".join(_text(f)[4].splitlines(keepends=True)[:9])], 4,
                          r"file ends inside the frame \(7 of \d+ atom lines; data_000.txt lists 1 more frames after it\)"),
    "truncated_after_count": (lambda f: _text(f)[:5] + ["27\n"], 5, r"file ends inside the frame \(0 of 27 atom lines\)"),
    "coincident": (lambda f: _text(_moved(f, 1, 3, 4, lambda c: 0.002)), 1,
                   r"atoms 3 and 4 coincide \(distance 3.46e-03 Å < 0.01 Å, periodic images included\)"),
    "coincident_image": (lambda f: _text(_moved(f, 2, 0, 9, lambda c: c[0] + c[1] + 0.003)), 2,
                         r"atoms 0 and 9 coincide \(distance 5.20e-03 Å"),
    "huge_energy": (lambda f: _text(_edit(f, 2, total_energy=1e30)), 2,
                    r"\|energy\| per atom is [\d.e+]+ eV \(energy 1e\+30 eV, \d+ atoms\), above the bound of 100 eV"),
    "nan_position": (lambda f: _text(_moved(f, 0, 0, 1, lambda c: np.nan)), 0,
                     r"field 'positions' contains NaN or inf"),
    "no_forces": (lambda f: [t if k != 4 else _no_forces(t) for k, t in enumerate(_text(f))], 4,
                  r"no forces \(eqv2 trains on energies and forces; every sample needs both\)"),
}


def _write(raw: Path, frames: list[dict], texts: list[str], index: int = 0) -> Path:
    write_raw(raw, frames, per_file=PER_FILE)  # the matching .txt (and, for index > 0, good earlier files)
    path = raw / f"data_{index:03d}.extxyz"
    path.write_text("".join(texts))
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_frame_is_one_line_then_skipped(tmp_path, frames, case):
    make, bad, problem = CASES[case]
    path = _write(tmp_path / "raw", frames, make(frames))
    r = _tool("shard", tmp_path / "raw", tmp_path / "out")
    assert r.returncode == 2, r.stdout + r.stderr
    assert re.fullmatch(rf"eqv2 shard: {re.escape(str(path))} frame {bad}: {problem}[^\n]*\n", r.stderr), r.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()
    r = _tool("shard", tmp_path / "raw", tmp_path / "out", "--on-error", "skip")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(rf"skipped: {re.escape(str(path))} frame {bad}: {problem}[^\n]*\n", r.stderr), r.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    lost = 2 if case == "truncated_at_line" else 1  # a cut frame 4 also loses frame 5 (named in the message)
    assert manifest["skipped_frames"] == 1 and manifest["num_samples"] == PER_FILE - lost
    assert "1 bad frames skipped" in r.stdout


def test_label_bounds_are_flags(tmp_path, frames):
    forces = np.array(frames[3]["forces"])
    forces[6, 2] = 2794.0  # what one flipped exponent bit makes of a force component
    edited = _edit(_edit(frames, 3, forces=forces), 1, total_energy=-5000.0)
    path = _write(tmp_path / "raw", edited, _text(edited))
    r = _tool("shard", tmp_path / "raw", tmp_path / "out", "--max-energy-per-atom", "500")
    assert r.returncode == 2 and r.stderr == (
        f"eqv2 shard: {path} frame 3: force component 2794 eV/Å on atom 6, above the bound 100 eV/Å "
        f"(if real, raise --max-force when sharding, data.max_force when training)\n"), r.stderr
    r = _tool("shard", tmp_path / "raw", tmp_path / "out", "--max-force", "3000")
    assert r.returncode == 2 and f"{path} frame 1: |energy| per atom is" in r.stderr, r.stderr
    r = _tool("shard", tmp_path / "raw", tmp_path / "out", "--max-force", "3000",
              "--max-energy-per-atom", "500")
    assert r.returncode == 0, r.stderr
    r = _tool("shard", tmp_path / "raw", tmp_path / "out", "--max-force", "-1")
    assert r.returncode == 2 and "--max-force must be a positive finite number" in r.stderr


def test_error_in_a_worker_process_is_one_line(tmp_path, frames):
    """With --workers 2 the bad frame is read in a pool process; its error still comes out as one line,
    and the skip count survives a resumed (killed and rerun) sharding run."""
    raw = tmp_path / "raw"
    more = oc20_frames(3 * PER_FILE, seed=6, sid0=3000000)
    write_raw(raw, more, per_file=PER_FILE)
    bad = raw / "data_001.extxyz"
    texts = _text(more[PER_FILE : 2 * PER_FILE])
    bad.write_text("".join(texts[:2] + [_unknown_symbol(texts[2], 0)] + texts[3:]))
    r = _tool("shard", raw, tmp_path / "out", "--workers", "2")
    assert r.returncode == 2 and r.stderr == f"eqv2 shard: {bad} frame 2: unknown element symbol 'Xx' (atom 0)\n"
    out = tmp_path / "out"
    r = _tool("shard", raw, out, "--workers", "2", "--on-error", "skip")
    assert r.returncode == 0 and json.loads((out / "manifest.json").read_text())["skipped_frames"] == 1
    # the run killed after its second shard (frames 0-7, the bad one #8 not yet read) ... and after its third
    for kept_shards, listed in ((2, 1), (3, 1)):
        resumed = tmp_path / f"resumed{kept_shards}"
        shutil.copytree(out, resumed)
        journal = (resumed / "progress.jsonl").read_text().splitlines()
        (resumed / "progress.jsonl").write_text("\n".join(journal[:kept_shards]) + "\n")
        (resumed / "manifest.json").unlink()
        r = _tool("shard", raw, resumed, "--on-error", "skip")
        assert r.returncode == 0, r.stderr
        manifest = json.loads((resumed / "manifest.json").read_text())
        assert manifest["skipped_frames"] == listed and manifest["num_samples"] == 3 * PER_FILE - 1
        assert manifest == json.loads((out / "manifest.json").read_text())


def _record(sample: dict, forces: bool = True) -> bytes:
    fields = dict(pos=torch.as_tensor(np.asarray(sample["positions"], np.float32)),
                  cell=torch.as_tensor(np.asarray(sample["cell"], np.float32)).view(1, 3, 3),
                  atomic_numbers=torch.as_tensor(np.asarray(sample["numbers"], np.float32)),
                  natoms=len(sample["numbers"]), sid=int(sample["sid"]), fid=int(sample["fid"]),
                  y=float(sample["energy"]))
    if forces:
        fields["force"] = torch.as_tensor(np.asarray(sample["forces"], np.float32))
    return pickle.dumps(Data(**fields), protocol=-1)


@pytest.mark.parametrize("case, problem", [
    ("huge_energy", r"\|energy\| per atom is .* above the bound of 100 eV"),
    ("flipped_force", r"force component 2794 eV/Å on atom 6, above the bound 100 eV/Å"),
    ("coincident", r"atoms 2 and 5 coincide"),
    ("bad_number", r"atomic numbers outside 1..118 \(min 1, max 200\)"),
    ("zero_atoms", r"no atoms \(an empty structure\)"),
    ("no_forces", r"no forces \("),
])
def test_bad_lmdb_record(tmp_path, frames, case, problem):
    samples = with_energy(copy.deepcopy(frames))
    s = samples[4]
    if case == "huge_energy":
        s["energy"] = 1e30
    elif case == "flipped_force":
        s["forces"][6, 1] = -2794.0
    elif case == "coincident":
        s["positions"][5] = s["positions"][2] + 1e-3
    elif case == "bad_number":
        s["numbers"] = np.array(s["numbers"]) * 0 + 1
        s["numbers"][3] = 200
    elif case == "zero_atoms":
        s.update(positions=np.zeros((0, 3)), numbers=np.zeros(0), forces=np.zeros((0, 3)), tags=np.zeros(0),
                 fixed=np.zeros(0))
    path = tmp_path / "data.0000.lmdb"
    write_lmdb(path, samples)
    if case in ("no_forces", "zero_atoms"):  # records as a writer without forces / atoms stores them
        env = lmdb.open(str(path), subdir=False, map_size=1 << 30)
        with env.begin(write=True) as txn:
            txn.put(b"4", _record(s, forces=case != "no_forces"))
        env.close()
    r = _tool("shard-lmdb", path, tmp_path / "out")
    assert r.returncode == 2, r.stdout + r.stderr
    assert re.fullmatch(rf"eqv2 shard-lmdb: {re.escape(str(path))} key 4: {problem}[^\n]*\n", r.stderr), r.stderr
    r = _tool("shard-lmdb", path, tmp_path / "out", "--on-error", "skip")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped_frames"] == 1 and manifest["num_samples"] == PER_FILE - 1


def test_missing_input_is_one_line(tmp_path):
    r = _tool("shard", tmp_path / "nowhere", tmp_path / "out")
    assert r.returncode == 2 and r.stderr == f"eqv2 shard: input directory not found: {tmp_path / 'nowhere'}\n"
