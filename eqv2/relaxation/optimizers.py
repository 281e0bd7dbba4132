"""Batched LBFGS and FIRE over many structures at once, each structure with its own step control.

Atoms of all structures are concatenated (`seg[i]` is atom i's structure, as `AtomsBatch.batch`); every
per-structure quantity (dot products, step limits, FIRE's time step) is a segment reduction, so one
step is a fixed number of kernels whatever the batch holds (for LBFGS, whatever its memory too). The
state of each optimizer is two dicts of tensors, one with atoms and one with structures on dim 0, so
that the engine can drop converged structures and append new ones with a gather and a concatenation
(`select`, `extend`).

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
DERIVED = frozenset({"sty", "yty"})  # state a snapshot may lack (written before it existed): `restore` recomputes it


def segment_sum(values: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """[n, ...] sums of `values` [N, ...] over the atoms of each structure."""
    return values.new_zeros(n, *values.shape[1:]).index_add_(0, seg, values)


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
    iteration); a structure that joins has all-zero slots (rho = 0), which contribute nothing, so it sees
    exactly its own last `memory` pairs, as ASE's LBFGS does.

    The step is what ASE's two-loop recursion computes, in the compact form of the L-BFGS inverse Hessian
    (Byrd, Nocedal & Schnabel 1994) with H0 = I/alpha: with S, Y a structure's pairs oldest first,
    R = triu(SᵀY) and D = diag(SᵀY), H g = H0 g + S p - H0 Y u, u = R⁻¹ Sᵀg, p = R⁻ᵀ((D + H0 YᵀY) u - H0 Yᵀg).
    The per-structure Gram matrices SᵀY and YᵀY ([B, m, m], state `sty`, `yty`) get one row and column per
    step; an unused slot (rho = 0: zero s and y) has a zero row and column and 1 on R's diagonal, so it
    decouples. A step is a fixed set of tensor operations whatever `memory` and however many slots are
    filled, with no host synchronisation: the ring position the kernels use is a device tensor."""

    def __init__(self, cfg: LBFGSConfig):
        self.cfg = cfg
        self.slot = 0  # ring position written next
        self.filled = 0  # ring slots written so far (at most memory), kept for the snapshot's scalars
        self._order: torch.Tensor | None = None  # [memory] device slots oldest to newest; [-1] = self.slot

    def scalars(self) -> dict[str, int]:
        """The optimizer's own state besides the tensors (the ring position), for an in-flight snapshot."""
        return {"slot": self.slot, "filled": self.filled}

    def load_scalars(self, values: dict[str, int]) -> None:
        self.slot, self.filled = int(values["slot"]), int(values["filled"])
        self._order = None

    def new_state(self, n_atoms: int, n_structs: int, like: torch.Tensor) -> State:
        m = self.cfg.memory
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=like.device)
        atoms = {"s": z(n_atoms, m, 3), "y": z(n_atoms, m, 3), "r0": z(n_atoms, 3), "f0": z(n_atoms, 3)}
        structs = {"rho": z(n_structs, m), "started": torch.zeros(n_structs, dtype=torch.bool, device=like.device),
                   "sty": z(n_structs, m, m), "yty": z(n_structs, m, m)}
        return atoms, structs

    def restore(self, state: State, seg: torch.Tensor) -> State:
        """A state read from a snapshot, with SᵀY and YᵀY recomputed from its pairs where it has none (a
        snapshot of eqv2 before the compact form; a current one has them, so a resume is bitwise exact)."""
        atoms, structs = state
        if DERIVED <= structs.keys():
            return state
        n = structs["rho"].shape[0]
        gram = lambda a, b: segment_sum(torch.einsum("nik,njk->nij", a, b), seg, n)
        return atoms, {**structs, "sty": gram(atoms["s"], atoms["y"]), "yty": gram(atoms["y"], atoms["y"])}

    def step(self, state: State, pos: torch.Tensor, forces: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        """New positions [N, 3] from positions and (constrained) forces [N, 3], float64; updates state."""
        atoms, structs = state
        m = self.cfg.memory
        if self._order is None or self._order.device != pos.device:
            self._order = (torch.arange(m, device=pos.device) + (self.slot + 1)) % m
        new = lbfgs_step(atoms, structs, self._order, pos, forces, seg, self.cfg)
        self._order = self._order.roll(-1)
        self.slot, self.filled = (self.slot + 1) % m, min(self.filled + 1, m)
        return new


def lbfgs_step(atoms: dict[str, torch.Tensor], structs: dict[str, torch.Tensor], order: torch.Tensor,
               pos: torch.Tensor, forces: torch.Tensor, seg: torch.Tensor, cfg: LBFGSConfig) -> torch.Tensor:
    """One LBFGS step of every structure (`BatchedLBFGS`), tensors only: `order` [m] holds the ring's slots
    oldest to newest, this step's slot last. Writes the new pair and updates the state in place."""
    n, h = structs["rho"].shape[0], 1.0 / cfg.alpha
    newest = order[-1:]  # [1]
    s, y, sty, yty, started = atoms["s"], atoms["y"], structs["sty"], structs["yty"], structs["started"]
    on = started[seg, None]
    s_new, y_new, g = (pos - atoms["r0"]) * on, (atoms["f0"] - forces) * on, -forces  # g: the gradient
    s.index_copy_(1, newest, s_new[:, None])
    y.index_copy_(1, newest, y_new[:, None])
    v = torch.stack([s_new, y_new, g], 1)  # [N, 3, 3]
    dots = segment_sum(torch.cat([torch.einsum("nak,nmk->nam", v, s), torch.einsum("nak,nmk->nam", v, y)], 1), seg, n)
    # dots [B, 6, m]: s_new·s_j, y_new·s_j, g·s_j, s_new·y_j, y_new·y_j, g·y_j
    sty.index_copy_(1, newest, dots[:, 3, None])  # row s_newᵀ y_j
    sty.index_copy_(2, newest, dots[:, 1, :, None])  # column s_iᵀ y_new
    yty.index_copy_(1, newest, dots[:, 4, None])
    yty.index_copy_(2, newest, dots[:, 4, :, None])
    ys = dots[:, 3].index_select(1, newest)[:, 0]  # [B]
    structs["rho"].index_copy_(1, newest, torch.where(started, 1.0 / torch.where(started, ys, 1.0), 0.0)[:, None])
    # the same in chronological order: R upper triangular, unused slots (rho = 0) decoupled by a 1 on its diagonal
    unused = structs["rho"].index_select(1, order) == 0  # [B, m]
    sty_c, yty_c = (t.index_select(1, order).index_select(2, order) for t in (sty, yty))  # [B, m, m]
    r = sty_c.triu()
    r.diagonal(dim1=1, dim2=2).add_(unused.to(r.dtype))
    a, b = dots[:, 2::3].index_select(2, order).unbind(1)  # [B, m]: Sᵀg, Yᵀg
    u = torch.linalg.solve_triangular(r, a[..., None], upper=True)  # [B, m, 1]
    w = sty_c.diagonal(dim1=1, dim2=2)[..., None] * u + h * (torch.bmm(yty_c, u) - b[..., None])
    p = torch.linalg.solve_triangular(r.mT, w, upper=False)
    # summed oldest to newest, not in ring order: a structure's step does not depend on where the ring stood when
    # it joined (a rerun or a resume gives the same bits as the uninterrupted run)
    coef = torch.cat([p, -h * u], 2).index_select(0, seg)  # [N, m, 2]
    s_c, y_c = s.index_select(1, order), y.index_select(1, order)
    hg = h * g + torch.einsum("nm,nmk->nk", coef[..., 0], s_c) + torch.einsum("nm,nmk->nk", coef[..., 1], y_c)
    dr = -hg  # [N, 3]
    longest = segment_max(dr.norm(dim=-1), seg, n)  # [B]
    scale = torch.where(longest > cfg.maxstep, cfg.maxstep / longest.clamp_min(1e-300), 1.0)
    dr = dr * (scale[seg, None] * cfg.damping)
    atoms["r0"], atoms["f0"] = pos.clone(), forces.clone()
    structs["started"] = torch.ones_like(started)
    return pos + dr


class BatchedFIRE:
    def __init__(self, cfg: FIREConfig):
        self.cfg = cfg

    def scalars(self) -> dict[str, int]:
        return {}  # all of FIRE's state is per structure or per atom

    def load_scalars(self, values: dict[str, int]) -> None:
        pass

    def restore(self, state: State, seg: torch.Tensor) -> State:
        return state  # nothing derived

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
