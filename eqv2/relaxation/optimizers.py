"""Batched LBFGS and FIRE over many structures at once, each structure with its own step control.

Atoms of all structures are concatenated (`seg[i]` is atom i's structure, as `AtomsBatch.batch`); every
per-structure quantity (dot products, step limits, FIRE's time step) is a segment reduction, so one
step is a fixed number of kernels whatever the batch holds. The state of each optimizer is two dicts of
tensors, one with atoms and one with structures on dim 0, so that the engine can drop converged
structures and append new ones with a gather and a concatenation (`select`, `extend`).

LBFGS is the one ASE and fairchem use for OC20 (no line search; the step of each structure is scaled
so that its largest atom displacement is at most `maxstep`, then multiplied by `damping`; initial
inverse Hessian 1/alpha); the defaults are fairchem's OC20 relaxation settings (its TRAIN.md:
maxstep 0.04, memory 50, damping 1.0, alpha 70.0). FIRE is ASE's (Bitzek et al. 2006) with its
defaults; as in ASE the step limit applies to the norm of the whole structure's displacement.
Arithmetic is float64, as fairchem's batched LBFGS (float32 curvature pairs overflow).
Forces given to `step` must already be zero on fixed atoms, which then never move.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

State = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]  # (per-atom tensors, per-structure tensors)


def segment_sum(values: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """[n] sums of `values` [N] over the atoms of each structure."""
    return values.new_zeros(n).index_add_(0, seg, values)


def segment_max(values: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """[n] maxima of non-negative `values` [N] per structure."""
    return values.new_zeros(n).scatter_reduce_(0, seg, values, "amax", include_self=True)


@dataclass
class LBFGSConfig:
    maxstep: float = 0.04  # Å, largest displacement of any atom in one step
    memory: int = 50  # curvature pairs kept per structure
    damping: float = 1.0  # the scaled step is multiplied by this
    alpha: float = 70.0  # eV/Å², initial Hessian guess (inverse Hessian 1/alpha)

    def __post_init__(self) -> None:
        if self.maxstep <= 0 or self.memory < 1 or self.damping <= 0 or self.alpha <= 0:
            raise ValueError(f"lbfgs: maxstep, damping and alpha must be > 0 and memory >= 1, got {self}")


@dataclass
class FIREConfig:
    dt: float = 0.1  # initial time step (ASE units)
    maxstep: float = 0.2  # Å, norm of one structure's whole displacement in one step
    dtmax: float = 1.0
    nmin: int = 5  # downhill steps before dt grows
    finc: float = 1.1
    fdec: float = 0.5
    astart: float = 0.1
    fa: float = 0.99

    def __post_init__(self) -> None:
        if self.dt <= 0 or self.maxstep <= 0 or self.dtmax <= 0:
            raise ValueError(f"fire: dt, maxstep and dtmax must be > 0, got {self}")


class BatchedLBFGS:
    """History as a ring of `memory` slots shared by all structures (every structure steps every
    iteration); a structure that joins has all-zero slots (rho = 0), which contribute nothing to the
    two-loop recursion, so it sees exactly its own last `memory` pairs, as ASE's LBFGS does."""

    def __init__(self, cfg: LBFGSConfig):
        self.cfg = cfg
        self.slot = 0  # ring position written next
        self.filled = 0  # ring slots written so far (at most memory): older slots are zero for every structure

    def scalars(self) -> dict[str, int]:
        """The optimizer's own state besides the tensors (the ring position), for an in-flight snapshot."""
        return {"slot": self.slot, "filled": self.filled}

    def load_scalars(self, values: dict[str, int]) -> None:
        self.slot, self.filled = int(values["slot"]), int(values["filled"])

    def new_state(self, n_atoms: int, n_structs: int, like: torch.Tensor) -> State:
        m = self.cfg.memory
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=like.device)
        atoms = {"s": z(n_atoms, m, 3), "y": z(n_atoms, m, 3), "r0": z(n_atoms, 3), "f0": z(n_atoms, 3)}
        structs = {"rho": z(n_structs, m), "started": torch.zeros(n_structs, dtype=torch.bool, device=like.device)}
        return atoms, structs

    def step(self, state: State, pos: torch.Tensor, forces: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        """New positions [N, 3] from positions and (constrained) forces [N, 3], float64; updates state."""
        atoms, structs = state
        n, m, w = structs["rho"].shape[0], self.cfg.memory, self.slot
        started = structs["started"]
        s_new = (pos - atoms["r0"]) * started[seg, None]  # [N, 3]
        y_new = (atoms["f0"] - forces) * started[seg, None]
        ys = segment_sum((y_new * s_new).sum(-1), seg, n)  # [B]
        atoms["s"][:, w], atoms["y"][:, w] = s_new, y_new
        structs["rho"][:, w] = torch.where(started, 1.0 / torch.where(started, ys, 1.0), 0.0)
        self.filled = min(self.filled + 1, m)
        q = -forces.clone()
        alphas = []
        for k in range(self.filled):  # newest to oldest
            j = (w - k) % m
            a = structs["rho"][:, j] * segment_sum((atoms["s"][:, j] * q).sum(-1), seg, n)  # [B]
            q -= a[seg, None] * atoms["y"][:, j]
            alphas.append(a)
        z = q / self.cfg.alpha
        for k in reversed(range(self.filled)):  # oldest to newest
            j = (w - k) % m
            b = structs["rho"][:, j] * segment_sum((atoms["y"][:, j] * z).sum(-1), seg, n)
            z += atoms["s"][:, j] * (alphas[k] - b)[seg, None]
        dr = -z  # [N, 3]
        longest = segment_max(dr.norm(dim=-1), seg, n)  # [B]
        scale = torch.where(longest > self.cfg.maxstep, self.cfg.maxstep / longest.clamp_min(1e-300), 1.0)
        dr = dr * (scale[seg, None] * self.cfg.damping)
        atoms["r0"], atoms["f0"] = pos.clone(), forces.clone()
        structs["started"] = torch.ones_like(started)
        self.slot = (w + 1) % m
        return pos + dr


class BatchedFIRE:
    def __init__(self, cfg: FIREConfig):
        self.cfg = cfg

    def scalars(self) -> dict[str, int]:
        return {}  # all of FIRE's state is per structure or per atom

    def load_scalars(self, values: dict[str, int]) -> None:
        pass

    def new_state(self, n_atoms: int, n_structs: int, like: torch.Tensor) -> State:
        f64 = dict(dtype=torch.float64, device=like.device)
        atoms = {"v": torch.zeros(n_atoms, 3, **f64)}
        structs = {"dt": torch.full((n_structs,), self.cfg.dt, **f64), "a": torch.full((n_structs,), self.cfg.astart, **f64),
                   "downhill": torch.zeros(n_structs, dtype=torch.int64, device=like.device),
                   "started": torch.zeros(n_structs, dtype=torch.bool, device=like.device)}
        return atoms, structs

    def step(self, state: State, pos: torch.Tensor, forces: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        atoms, st = state
        c, n = self.cfg, st["dt"].shape[0]
        v = atoms["v"]
        vf = segment_sum((forces * v).sum(-1), seg, n)
        f_norm = segment_sum((forces * forces).sum(-1), seg, n).sqrt()
        v_norm = segment_sum((v * v).sum(-1), seg, n).sqrt()
        uphill = st["started"] & (vf <= 0)
        downhill = st["started"] & (vf > 0)
        mix = torch.where(downhill, st["a"], 0.0)
        ratio = torch.where(downhill, v_norm / f_norm.clamp_min(1e-300), 0.0)
        v = (1.0 - mix)[seg, None] * v + (mix * ratio)[seg, None] * forces
        v = v * (~uphill)[seg, None]
        grow = downhill & (st["downhill"] > c.nmin)
        st["dt"] = torch.where(grow, (st["dt"] * c.finc).clamp_max(c.dtmax), st["dt"])
        st["a"] = torch.where(grow, st["a"] * c.fa, st["a"])
        st["dt"] = torch.where(uphill, st["dt"] * c.fdec, st["dt"])
        st["a"] = torch.where(uphill, torch.full_like(st["a"], c.astart), st["a"])
        st["downhill"] = torch.where(downhill, st["downhill"] + 1, torch.where(uphill, 0, st["downhill"]))
        dt = st["dt"][seg, None]
        v = v + dt * forces
        dr = dt * v
        norm = segment_sum((dr * dr).sum(-1), seg, n).sqrt()
        scale = torch.where(norm > c.maxstep, c.maxstep / norm.clamp_min(1e-300), 1.0)
        atoms["v"] = v
        st["started"] = torch.ones_like(st["started"])
        return pos + dr * scale[seg, None]


def select(state: State, atom_index: torch.Tensor, struct_index: torch.Tensor) -> State:
    """The state of the kept atoms and structures (indices into dim 0)."""
    atoms, structs = state
    return {k: v[atom_index] for k, v in atoms.items()}, {k: v[struct_index] for k, v in structs.items()}


def extend(state: State, new: State) -> State:
    """The state with `new` (of structures appended after the existing ones) concatenated."""
    return ({k: torch.cat([v, new[0][k]]) for k, v in state[0].items()},
            {k: torch.cat([v, new[1][k]]) for k, v in state[1].items()})
