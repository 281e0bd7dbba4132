"""The in-flight state of a relaxation job: the structures it was relaxing when it stopped, so that a rerun
continues them where they were instead of starting them again from their initial positions.

A `Snapshot` holds, for every structure in the batch, its id, a digest of its input (numbers, initial
positions, cell, pbc, fixed atoms), its current positions, the optimizer steps it has taken (which is
also the number of trajectory frames written for it) and its rows of the optimizer state (LBFGS: the
curvature pairs, rho, their Gram matrices SᵀY and YᵀY, last positions and forces; FIRE: velocities, time
step, mixing and downhill count),
plus the optimizer's scalars (the LBFGS ring position). The engine takes one after an optimizer step
(every `--checkpoint-every` steps and when a stop is asked for); `save` writes it as
`OUT/inflight.<task>.pt` under a temporary name, fsyncs and renames it, so a kill leaves the previous
whole file or the new one. `load` checks it against this run before anything is trusted: the file's
kind and version, the task, the optimizer settings and, for each structure, that this task's input has
a structure of that id with the same digest; a file that fails any check is refused with one line
naming it (`--discard-inflight` starts those structures afresh instead). A file written before the LBFGS
Gram matrices were state (`optimizers.DERIVED`) still loads: the engine recomputes them from the pairs.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from eqv2.relaxation.optimizers import DERIVED

if TYPE_CHECKING:
    from eqv2.relaxation.engine import RelaxConfig, Structure

KIND = "eqv2 relax in-flight state"
VERSION = 1


class InflightError(ValueError):
    """The in-flight state file is unreadable or belongs to another run; the message names the file."""


@dataclass
class Snapshot:
    structures: list  # [B] Structure, in batch order
    steps: list[int]  # [B] optimizer steps taken (= trajectory frames written)
    positions: torch.Tensor  # [N, 3] float64, current positions of the batch's atoms
    optimizer_atoms: dict[str, torch.Tensor] = field(default_factory=dict)  # dim 0: atoms
    optimizer_structs: dict[str, torch.Tensor] = field(default_factory=dict)  # dim 0: structures
    optimizer_scalars: dict[str, int] = field(default_factory=dict)
    iteration: int = 0  # batch iterations of the job that wrote it

    def without(self, sids: set[str]) -> "Snapshot":
        """The snapshot less the structures in `sids` (those that finished after it was written)."""
        keep = [s.sid not in sids for s in self.structures]
        sizes = [len(s.numbers) for s in self.structures]
        atom_keep = torch.tensor(np.repeat(keep, sizes), dtype=torch.bool)
        struct_keep = torch.tensor(keep, dtype=torch.bool)
        return Snapshot([s for s, k in zip(self.structures, keep) if k], [n for n, k in zip(self.steps, keep) if k],
                        self.positions[atom_keep], {k: v[atom_keep] for k, v in self.optimizer_atoms.items()},
                        {k: v[struct_keep] for k, v in self.optimizer_structs.items()}, dict(self.optimizer_scalars),
                        self.iteration)


def state_path(out_dir: str | Path, task: int) -> Path:
    return Path(out_dir) / f"inflight.{task}.pt"


def structure_digest(s: "Structure") -> str:
    """sha256 of what fixes a structure's relaxation: numbers, initial positions, cell, pbc, fixed atoms."""
    h = hashlib.sha256()
    for a, dtype in ((s.numbers, np.int64), (s.positions, np.float64), (s.cell, np.float64), (s.pbc, np.bool_),
                     (s.fixed, np.bool_)):
        h.update(np.ascontiguousarray(np.asarray(a, dtype)).tobytes())
    return h.hexdigest()


def relax_settings(cfg: "RelaxConfig") -> dict:
    """The settings a continued relaxation must share with the one that wrote the state (batching may differ:
    a structure's relaxation does not depend on what else is in its batch)."""
    out = {"optimizer": cfg.optimizer, "fmax": cfg.fmax, "steps": cfg.steps}
    out[cfg.optimizer] = asdict(cfg.lbfgs if cfg.optimizer == "lbfgs" else cfg.fire)
    return out


def save(path: str | Path, snap: Snapshot, cfg: "RelaxConfig", task: int, num_tasks: int) -> None:
    """Write `snap` atomically (temporary file, fsync, rename); an empty snapshot removes the file."""
    path = Path(path)
    if not snap.structures:
        path.unlink(missing_ok=True)
        return
    record = {"kind": KIND, "version": VERSION, "task": [task, num_tasks], "settings": relax_settings(cfg),
              "sids": [s.sid for s in snap.structures], "digests": [structure_digest(s) for s in snap.structures],
              "natoms": [len(s.numbers) for s in snap.structures], "steps": list(snap.steps),
              "positions": snap.positions, "optimizer_atoms": snap.optimizer_atoms,
              "optimizer_structs": snap.optimizer_structs, "optimizer_scalars": snap.optimizer_scalars,
              "iteration": snap.iteration}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(record, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fail(path: Path, why: str) -> InflightError:
    return InflightError(f"{path}: {why}; rerun with --discard-inflight to relax its structures again from "
                         f"their initial positions")


def load(path: str | Path, cfg: "RelaxConfig", task: int, num_tasks: int, inputs: dict[str, "Structure"],
         expected: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]) -> Snapshot:
    """The snapshot in `path`, checked against this run: `inputs` are this task's structures by id and
    `expected` a fresh optimizer state of one atom and one structure (the tensor names, trailing shapes and
    dtypes a snapshot of this optimizer must have)."""
    path = Path(path)
    try:
        rec = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise _fail(path, f"not a readable in-flight state ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    if not isinstance(rec, dict) or rec.get("kind") != KIND or rec.get("version") != VERSION:
        raise _fail(path, f"not an in-flight state of this eqv2 version (want {KIND!r} version {VERSION})")
    try:
        return _checked(path, rec, cfg, task, num_tasks, inputs, expected)
    except (KeyError, TypeError, IndexError) as err:
        raise _fail(path, f"a damaged in-flight state ({type(err).__name__}: {err})") from None


def _checked(path: Path, rec: dict, cfg: "RelaxConfig", task: int, num_tasks: int, inputs: dict[str, "Structure"],
             expected: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]) -> Snapshot:
    if rec["task"] != [task, num_tasks]:
        raise _fail(path, f"written by task {rec['task'][0]} of {rec['task'][1]}, this is task {task} of {num_tasks}")
    settings = relax_settings(cfg)
    if rec["settings"] != settings:
        keys = sorted(k for k in set(settings) | set(rec["settings"]) if settings.get(k) != rec["settings"].get(k))
        diff = ", ".join(f"{k} {rec['settings'].get(k)} there, {settings.get(k)} here" for k in keys)
        raise _fail(path, f"written with other relaxation settings ({diff})")
    structures = []
    for sid, digest in zip(rec["sids"], rec["digests"]):
        s = inputs.get(sid)
        if s is None:
            raise _fail(path, f"structure {sid} in flight there is not in this task's input (another input set?)")
        if structure_digest(s) != digest:
            raise _fail(path, f"structure {sid} in flight there differs from this input's structure {sid} "
                              f"(another input set?)")
        structures.append(s)
    n_atoms, n_structs = sum(rec["natoms"]), len(structures)
    if rec["natoms"] != [len(s.numbers) for s in structures] or len(rec["steps"]) != n_structs:
        raise _fail(path, "atom or step counts do not match its structures (a damaged file)")
    tensors = {"positions": (rec["positions"], torch.zeros(n_atoms, 3, dtype=torch.float64))}
    for group, want, n in (("optimizer_atoms", expected[0], n_atoms), ("optimizer_structs", expected[1], n_structs)):
        want = {k: v for k, v in want.items() if k in rec[group] or k not in DERIVED}  # older files: recomputed
        if set(rec[group]) != set(want):
            raise _fail(path, f"{group} holds {sorted(rec[group])}, this optimizer needs {sorted(want)}")
        tensors.update({f"{group}.{k}": (rec[group][k], want[k].new_zeros((n, *want[k].shape[1:]))) for k in want})
    for name, (got, like) in tensors.items():
        if not isinstance(got, torch.Tensor) or got.shape != like.shape or got.dtype != like.dtype:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise _fail(path, f"{name} of shape {shape}, want {tuple(like.shape)} {like.dtype} (a damaged file)")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise _fail(path, f"{name} is not finite (a damaged file)")
    return Snapshot(structures, [int(n) for n in rec["steps"]], rec["positions"], rec["optimizer_atoms"],
                    rec["optimizer_structs"], {k: int(v) for k, v in rec["optimizer_scalars"].items()},
                    int(rec["iteration"]))
