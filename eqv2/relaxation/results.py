"""Relaxation results on disk, written per structure as it finishes, so that a stopped job resumes.

`results.<part>.jsonl` (one per array task; part 0 for a single job): one JSON line per finished
structure, flushed and fsynced when written. A job started again on the same output directory reads
every part, skips the structures already there and relaxes the rest; structures that were in flight
when it stopped start again from their initial positions (the relaxation is deterministic, so the
result is what an uninterrupted run gives). A line cut short by a kill is dropped on reopening.
The task that finishes last (each leaves `.done.<task>`), or `eqv2 relax --collect`, turns the parts into fairchem's IS2RS/IS2RE prediction files:
    is2rs.npz: ids [S], pos [sum atoms, 3] (relaxed), chunk_idx [S-1] (split points of pos)
    is2re.npz: ids [S], energy [S] (eV)
sorted by id, as fairchem's relaxation writes them (its `relaxed_positions.npz`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from eqv2.relaxation.engine import Result, Structure


def _record(r: Result) -> dict:
    s = r.structure
    rec = {"sid": s.sid, "energy": r.energy, "fmax": r.fmax, "steps": r.steps, "converged": r.converged,
           "numbers": s.numbers.tolist(), "cell": np.asarray(s.cell).tolist(), "pbc": np.asarray(s.pbc).tolist(),
           "fixed": np.asarray(s.fixed).tolist(), "positions": r.positions.tolist(),
           "initial_positions": np.asarray(s.positions).tolist()}
    if s.target_positions is not None:
        rec["target_positions"] = np.asarray(s.target_positions).tolist()
    for key in ("target_energy", "initial_energy"):
        if getattr(s, key) is not None:
            rec[key] = getattr(s, key)
    return rec


def result_from_record(rec: dict) -> Result:
    arr = lambda k: None if k not in rec else np.asarray(rec[k], np.float64)
    s = Structure(sid=rec["sid"], numbers=np.asarray(rec["numbers"], np.int64), positions=arr("initial_positions"),
                  cell=arr("cell"), pbc=np.asarray(rec["pbc"], bool), fixed=np.asarray(rec["fixed"], bool),
                  target_positions=arr("target_positions"), target_energy=rec.get("target_energy"),
                  initial_energy=rec.get("initial_energy"))
    return Result(s, arr("positions"), float(rec["energy"]), float(rec["fmax"]), int(rec["steps"]), bool(rec["converged"]))


def _read_lines(path: Path) -> list[dict]:
    records = []
    text = path.read_text()
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if not text.endswith(line):  # only the last, unterminated line may be cut short
                raise ValueError(f"{path} line {lineno}: not a JSON record (a damaged results file)") from None
    return records


def load_results(out_dir: str | Path) -> dict[str, Result]:
    """Every finished structure of every part in `out_dir`, by sid."""
    results = {}
    for path in sorted(Path(out_dir).glob("results.*.jsonl")):
        for rec in _read_lines(path):
            results[rec["sid"]] = result_from_record(rec)
    return results


class ResultWriter:
    def __init__(self, out_dir: str | Path, part: int = 0):
        self.path = Path(out_dir) / f"results.{part}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop a line a kill cut short, so that appends start on a fresh line
            data = self.path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(keep)
        self.file = open(self.path, "a")

    def write(self, result: Result) -> None:
        self.file.write(json.dumps(_record(result), separators=(",", ":")) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def collect(out_dir: str | Path) -> tuple[Path, Path, int]:
    """Write is2rs.npz and is2re.npz of every result in `out_dir`; returns (is2rs, is2re, count)."""
    out_dir = Path(out_dir)
    results = load_results(out_dir)
    if not results:
        raise ValueError(f"{out_dir}: no relaxation results (results.*.jsonl)")
    ids = sorted(results)
    pos = [results[i].positions for i in ids]
    is2rs, is2re = out_dir / "is2rs.npz", out_dir / "is2re.npz"
    _save(is2rs, ids=np.array(ids), pos=np.concatenate(pos), chunk_idx=np.cumsum([len(p) for p in pos])[:-1])
    _save(is2re, ids=np.array(ids), energy=np.array([results[i].energy for i in ids]))
    return is2rs, is2re, len(ids)


def _save(path: Path, **arrays) -> None:
    """Written under a temporary name, then renamed: two tasks collecting at once leave a whole file."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


class Trajectories:
    """ASE trajectory files `<dir>/<sid>.traj`, one frame per evaluation (energy and forces attached);
    a structure that starts again starts its file afresh, one continued from an in-flight state (`resume`)
    keeps the frames up to the state and appends."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.open: dict[str, object] = {}

    def frame(self, s: Structure, positions: np.ndarray, energy: float, forces: np.ndarray) -> None:
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator
        from ase.constraints import FixAtoms
        from ase.io import Trajectory

        if s.sid not in self.open:
            self.open[s.sid] = Trajectory(str(self.dir / f"{s.sid}.traj"), "w")
        atoms = Atoms(numbers=s.numbers, positions=positions, cell=s.cell, pbc=s.pbc,
                      constraint=FixAtoms(mask=s.fixed), tags=s.tags)
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        self.open[s.sid].write(atoms)

    def resume(self, sid: str, frames: int) -> None:
        """Continue `<sid>.traj` after its first `frames` frames (the evaluations before the in-flight state;
        frames a stopped job wrote after it are dropped)."""
        from ase.io import Trajectory

        path = self.dir / f"{sid}.traj"
        kept = []
        if path.exists():
            with Trajectory(str(path), "r") as old:
                kept = [old[i] for i in range(min(frames, len(old)))]
        tmp = path.with_name(f".{path.name}.tmp")
        with Trajectory(str(tmp), "w") as new:
            for atoms in kept:
                new.write(atoms)
        os.replace(tmp, path)
        self.open[sid] = Trajectory(str(path), "a")

    def finish(self, sid: str) -> None:
        traj = self.open.pop(sid, None)
        if traj is not None:
            traj.close()

    def close(self) -> None:
        for sid in list(self.open):
            self.finish(sid)
