"""The batched relaxation engine: many structures in one batch under an atom budget, refilled as they finish.

Every iteration evaluates one batch (energies and forces of all active structures), retires the
structures that have converged (largest force on a free atom below `fmax`) or used their `steps`
optimizer steps, and moves the others one optimizer step; freed room is then refilled from the
queue, so the batch stays full until the queue runs dry. A structure's result is the energy and
positions of its last evaluation, as ASE's and fairchem's optimizers report them (`steps` steps take
steps + 1 evaluations).

A stopped job continues where it was: after an optimizer step the engine hands a `Snapshot` of the
batch (positions, step counts, optimizer state; eqv2/relaxation/inflight.py) to `checkpoint`, every
`checkpoint_every` steps and when `stop()` says so (it then returns); `relax(resume=snapshot)` starts
with that batch, so a continued structure takes exactly the steps it would have taken uninterrupted.

Forces come from any `ForceProvider`: `PotentialForces` (an eqv2 model: eV, eV/Å, energy references
added) or `AseForces` (any ASE calculator, one structure at a time: EMT in the tests, so that the
engine is checked against ASE's own optimizers on real physics).

Why not torch-sim (torch-sim-atomistic 0.3.0, the newest on the package index here): it has FIRE and
gradient descent but no LBFGS (OC20's optimizer), no fixed atoms, and its in-flight batcher swaps
structures only every `steps_between_swaps` steps with a global step limit; it would also add
h5py/PyTables to the environment. See docs/relaxations.md.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import torch

from eqv2.batch import AtomsBatch
from eqv2.relaxation.inflight import Snapshot
from eqv2.relaxation.optimizers import (BatchedFIRE, BatchedLBFGS, FIREConfig, LBFGSConfig, extend, segment_max,
                                        select)


@dataclass
class Structure:
    """One structure to relax, with its relaxed reference when known (IS2RS / IS2RE targets)."""
    sid: str
    numbers: np.ndarray  # [n] int
    positions: np.ndarray  # [n, 3] Å, initial
    cell: np.ndarray  # [3, 3]
    pbc: np.ndarray  # [3] bool
    fixed: np.ndarray  # [n] bool
    tags: np.ndarray | None = None  # [n]
    target_positions: np.ndarray | None = None  # [n, 3] relaxed (DFT) positions
    target_energy: float | None = None  # relaxed (DFT) energy, eV
    initial_energy: float | None = None  # DFT energy of the initial structure, eV


@dataclass
class Result:
    structure: Structure
    positions: np.ndarray  # [n, 3] final
    energy: float  # eV, at the final positions
    fmax: float  # eV/Å, largest force on a free atom at the final positions
    steps: int  # optimizer steps taken
    converged: bool


@dataclass
class RelaxConfig:
    optimizer: str = "lbfgs"  # lbfgs | fire
    fmax: float = 0.02  # eV/Å; fairchem's default relaxation_fmax
    steps: int = 300  # optimizer steps per structure; fairchem's OC20 relaxation_steps
    max_atoms: int = 2000  # atoms per batch (a structure larger than this runs alone)
    max_structures: int = 0  # structures per batch, 0 = no limit besides max_atoms
    lbfgs: LBFGSConfig = field(default_factory=LBFGSConfig)
    fire: FIREConfig = field(default_factory=FIREConfig)

    def __post_init__(self) -> None:
        if self.optimizer not in ("lbfgs", "fire"):
            raise ValueError(f"relax.optimizer must be lbfgs or fire, got {self.optimizer!r}")
        if self.fmax <= 0 or self.steps < 0 or self.max_atoms < 1 or self.max_structures < 0:
            raise ValueError(f"relax: fmax > 0, steps >= 0, max_atoms >= 1, max_structures >= 0 required, got {self}")


@dataclass
class RelaxStats:
    """What one `relax` call did: structure evaluations, batch iterations, structures continued from a
    snapshot (with the steps they had taken), and whether it stopped on request."""
    evaluations: int = 0
    iterations: int = 0
    resumed: dict[str, int] = field(default_factory=dict)
    stopped: bool = False


class ForceProvider(Protocol):
    def __call__(self, batch: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(energy [B] eV, forces [N, 3] eV/Å) of a batch."""


class PotentialForces:
    """An eqv2 `Potential` (from `eqv2.load_model`, the float32 reference path) or `InferencePotential`
    (`eqv2.inference.load_for_inference`: bf16, fused kernels, compiled per shape bucket) as a force provider."""

    def __init__(self, potential: torch.nn.Module):
        self.potential = potential.eval()

    @torch.no_grad()
    def __call__(self, batch: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.potential(batch)
        return out["energy"], out["forces"]


class AseForces:
    """An ASE calculator as a force provider, one structure at a time on the host."""

    def __init__(self, calculator):
        self.calculator = calculator

    def __call__(self, batch: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        from ase import Atoms

        energies, forces = [], []
        for i, (lo, hi) in enumerate(_bounds(batch.natoms)):
            atoms = Atoms(numbers=batch.atomic_numbers[lo:hi].cpu().numpy(), positions=batch.pos[lo:hi].cpu().double().numpy(),
                          cell=batch.cell[i].cpu().double().numpy(), pbc=batch.pbc[i].cpu().numpy())
            atoms.calc = self.calculator
            energies.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces())
        dev = batch.pos.device
        return (torch.tensor(energies, dtype=torch.float64, device=dev),
                torch.as_tensor(np.concatenate(forces), dtype=torch.float64, device=dev))


def _bounds(natoms: torch.Tensor) -> list[tuple[int, int]]:
    ends = np.cumsum(natoms.cpu().numpy())
    return [(int(e - n), int(e)) for e, n in zip(ends, natoms.cpu().numpy())]


class _Active:
    """The concatenated tensors of the structures in the batch (dim 0: atoms or structures)."""

    def __init__(self, device: torch.device, float_dtype: torch.dtype):
        self.device, self.float_dtype = device, float_dtype
        self.items: list[Structure] = []
        self.steps = torch.zeros(0, dtype=torch.int64, device=device)  # [B] optimizer steps taken
        self.seg = torch.zeros(0, dtype=torch.int64, device=device)  # [N] structure of each atom
        f64 = dict(dtype=torch.float64, device=device)
        self.pos = torch.zeros(0, 3, **f64)
        self.numbers = torch.zeros(0, dtype=torch.int64, device=device)
        self.fixed = torch.zeros(0, dtype=torch.bool, device=device)
        self.tags = torch.zeros(0, dtype=torch.int64, device=device)
        self.cell = torch.zeros(0, 3, 3, **f64)
        self.pbc = torch.zeros(0, 3, dtype=torch.bool, device=device)
        self.natoms = torch.zeros(0, dtype=torch.int64, device=device)

    @property
    def num_atoms(self) -> int:
        return int(self.pos.shape[0])

    def _update_seg(self, sizes: list[int]) -> None:  # from host sizes: no device sync
        self.seg = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.int64)).to(self.device)

    def add(self, new: list[Structure]) -> None:
        dev = self.device
        cat = lambda old, arrays, dt: torch.cat([old, torch.as_tensor(np.concatenate(arrays), dtype=dt, device=dev)])
        self.pos = cat(self.pos, [s.positions for s in new], torch.float64)
        self.numbers = cat(self.numbers, [s.numbers for s in new], torch.int64)
        self.fixed = cat(self.fixed, [s.fixed for s in new], torch.bool)
        self.tags = cat(self.tags, [s.tags if s.tags is not None else np.zeros(len(s.numbers)) for s in new], torch.int64)
        self.cell = cat(self.cell, [np.asarray(s.cell, np.float64)[None] for s in new], torch.float64)
        self.pbc = cat(self.pbc, [np.asarray(s.pbc, bool)[None] for s in new], torch.bool)
        self.natoms = cat(self.natoms, [[len(s.numbers)] for s in new], torch.int64)
        self.items += new
        self.steps = torch.cat([self.steps, torch.zeros(len(new), dtype=torch.int64, device=dev)])
        self._update_seg([len(s.numbers) for s in self.items])

    def keep(self, keep: torch.Tensor) -> torch.Tensor:
        """Keep the structures where `keep` [B] is True; returns the kept atoms' indices."""
        atom_index = torch.nonzero(keep[self.seg]).squeeze(1)
        struct_index = torch.nonzero(keep).squeeze(1)
        flags = keep.tolist()
        self.items = [s for s, k in zip(self.items, flags) if k]
        self.steps = self.steps[struct_index]
        self._update_seg([len(s.numbers) for s in self.items])
        self.pos, self.numbers, self.fixed, self.tags = (t[atom_index] for t in (self.pos, self.numbers, self.fixed, self.tags))
        self.cell, self.pbc, self.natoms = (t[struct_index] for t in (self.cell, self.pbc, self.natoms))
        return atom_index, struct_index

    def wrapped_positions(self) -> torch.Tensor:
        """The positions wrapped into the cell along the periodic axes, in float64 on the device, as
        `eqv2.calculator.wrapped_positions` (ASE's wrap_positions, eps=0) gives the ASE calculator's and
        fairchem's batches: the same function of the positions, the same float32 round-off, so the same
        choice among tied neighbours. The optimizer keeps the unwrapped positions (continuous paths).
        Structures with no periodic axis or a singular cell are left as they are."""
        cell = self.cell[self.seg]  # [N, 3, 3]
        usable = self.pbc.any(dim=1) & (torch.linalg.det(self.cell).abs() > 1e-12)  # [B]
        eye = torch.eye(3, dtype=cell.dtype, device=cell.device)
        # inv_ex: linalg.inv checks for singular matrices, a host sync on CUDA every step (none can be singular here)
        inverse = torch.linalg.inv_ex(torch.where(usable[:, None, None], self.cell, eye)).inverse[self.seg]
        frac = torch.einsum("ni,nij->nj", self.pos, inverse)
        frac = torch.where(self.pbc[self.seg], torch.remainder(frac, 1.0), frac)
        wrapped = torch.einsum("ni,nij->nj", frac, cell)
        return torch.where(usable[self.seg, None], wrapped, self.pos)

    def batch(self) -> AtomsBatch:
        return AtomsBatch(pos=self.wrapped_positions().to(self.float_dtype), atomic_numbers=self.numbers,
                          cell=self.cell.to(self.float_dtype),
                          pbc=self.pbc, natoms=self.natoms, batch=self.seg, tags=self.tags, fixed=self.fixed,
                          ids=[s.sid for s in self.items])


def _clone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}


def make_optimizer(cfg: RelaxConfig) -> BatchedLBFGS | BatchedFIRE:
    return BatchedLBFGS(cfg.lbfgs) if cfg.optimizer == "lbfgs" else BatchedFIRE(cfg.fire)


def relax(structures: Iterable[Structure], forces: ForceProvider, cfg: RelaxConfig,
          device: torch.device | str = "cpu", float_dtype: torch.dtype = torch.float32,
          on_frame: Callable[[Structure, np.ndarray, float, np.ndarray], None] | None = None,
          resume: Snapshot | None = None, checkpoint: Callable[[Snapshot], None] | None = None,
          checkpoint_every: int = 0, stop: Callable[[], bool] | None = None,
          stats: RelaxStats | None = None) -> Iterator[Result]:
    """Relax `structures`, yielding each result as its structure finishes (not in input order).

    float_dtype: positions and cells as the force provider gets them (the optimizer works in float64).
    on_frame(structure, positions, energy, forces): called for every evaluation of every structure (trajectories).
    resume: a snapshot to continue (its structures must not be in `structures` too); checkpoint(snapshot):
    called after every `checkpoint_every`-th optimizer step (0: never) and, with the batch as it stands, when
    `stop()` turns true after a step, after which `relax` returns (stats.stopped)."""
    device = torch.device(device)
    stats = stats if stats is not None else RelaxStats()
    opt = make_optimizer(cfg)
    queue = iter(structures)
    waiting: deque[Structure] = deque()
    active = _Active(device, float_dtype)
    state = opt.new_state(0, 0, active.pos)
    if resume is not None and resume.structures:
        active.add(resume.structures)
        active.pos = resume.positions.to(device=device, dtype=torch.float64)
        active.steps = torch.tensor(resume.steps, dtype=torch.int64, device=device)
        state = opt.restore(({k: v.to(device) for k, v in resume.optimizer_atoms.items()},
                             {k: v.to(device) for k, v in resume.optimizer_structs.items()}), active.seg)
        opt.load_scalars(resume.optimizer_scalars)
        stats.resumed.update({s.sid: n for s, n in zip(resume.structures, resume.steps)})

    def snapshot() -> Snapshot:
        return Snapshot(list(active.items), active.steps.tolist(), active.pos.detach().to("cpu", copy=True),
                        _clone(state[0]), _clone(state[1]), opt.scalars(), stats.iterations)

    exhausted = False
    while True:
        new, atoms = [], active.num_atoms
        while not exhausted or waiting:  # refill up to the budget (a lone oversized structure runs alone)
            if not waiting:
                nxt = next(queue, None)
                if nxt is None:
                    exhausted = True
                    break
                waiting.append(nxt)
            n = len(waiting[0].numbers)
            full = cfg.max_structures and len(active.items) + len(new) >= cfg.max_structures
            if full or (atoms + n > cfg.max_atoms and (active.items or new)):
                break
            new.append(waiting.popleft())
            atoms += n
        if new:
            active.add(new)
            state = extend(state, opt.new_state(sum(len(s.numbers) for s in new), len(new), active.pos))
        if not active.items:
            return
        energy, f = forces(active.batch())
        stats.evaluations += len(active.items)
        f = f.to(torch.float64) * (~active.fixed)[:, None]  # fixed atoms feel no force and never move
        fmax = segment_max(f.norm(dim=-1), active.seg, len(active.items))  # [B]
        done = (fmax < cfg.fmax) | (active.steps >= cfg.steps)
        any_done = bool(done.any())  # the one host sync of an iteration
        if on_frame is not None or any_done:
            pos_host, e_host, f_host = active.pos.cpu().numpy(), energy.double().cpu().numpy(), f.cpu().numpy()
            fmax_host, done_host, steps_host = fmax.cpu().numpy(), done.cpu().numpy(), active.steps.cpu().numpy()
            for i, ((lo, hi), s) in enumerate(zip(_bounds(active.natoms), active.items)):
                if on_frame is not None:
                    on_frame(s, pos_host[lo:hi], float(e_host[i]), f_host[lo:hi])
                if done_host[i]:
                    yield Result(s, pos_host[lo:hi].copy(), float(e_host[i]), float(fmax_host[i]), int(steps_host[i]),
                                 bool(fmax_host[i] < cfg.fmax))
        if any_done:
            atom_index, struct_index = active.keep(~done)
            state, f = select(state, atom_index, struct_index), f[atom_index]
        if active.items:
            active.pos = opt.step(state, active.pos, f, active.seg)
            active.steps += 1
            stats.iterations += 1
            if checkpoint is not None and checkpoint_every and stats.iterations % checkpoint_every == 0:
                checkpoint(snapshot())
        if stop is not None and (active.items or waiting or not exhausted) and stop():  # after a step: the
            if checkpoint is not None:  # snapshot holds what the next iteration would evaluate
                checkpoint(snapshot())
            stats.stopped = True
            return
